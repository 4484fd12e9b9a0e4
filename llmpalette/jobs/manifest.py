"""The job manifest: what was asked (recipe and hash, model identity), who did it (world size), and
for every unit of work its files with their sha256, so a resumed job can tell intact from corrupt.

The manifest is rewritten atomically after the files it names are complete.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmpalette.errors import JobError
from llmpalette.jobs.files import atomic_write_text, sha256_file

FORMAT = "llmpalette-job/1"
MANIFEST = "manifest.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Manifest:
    job_dir: Path
    data: dict[str, Any]

    @classmethod
    def create(cls, job_dir: Path, *, recipe: dict, recipe_sha256: str, model: dict, world_size: int) -> "Manifest":
        data = {
            "format": FORMAT,
            "created": _now(),
            "recipe_sha256": recipe_sha256,
            "recipe": recipe,
            "model": model,
            "world_size": world_size,
            "runs": [],
            "stages": [],
        }
        return cls(Path(job_dir), data)

    @classmethod
    def exists(cls, job_dir: Path) -> bool:
        return (Path(job_dir) / MANIFEST).exists()

    @classmethod
    def load(cls, job_dir: Path) -> "Manifest":
        path = Path(job_dir) / MANIFEST
        if not path.exists():
            raise JobError(f"{job_dir} is not a job directory: it has no {MANIFEST}; run `llmpalette compress RECIPE --job-dir {job_dir}` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JobError(f"{path} is not valid JSON ({e}); the job cannot be resumed, start it again in a new --job-dir") from None
        if data.get("format") != FORMAT:
            raise JobError(f"{path}: unknown manifest format {data.get('format')!r} (expected {FORMAT})")
        return cls(Path(job_dir), data)

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_text(self.job_dir / MANIFEST, json.dumps(self.data, indent=1, sort_keys=False) + "\n")

    # -- runs and stages ----------------------------------------------------------------------
    def start_run(self, world_size: int, resumed: bool) -> None:
        self.data["world_size"] = world_size
        self.data["runs"].append({"started": _now(), "world_size": world_size, "resumed": resumed})

    def stage(self, index: int, *, name: str, algorithm: str) -> dict:
        stages = self.data["stages"]
        while len(stages) <= index:
            stages.append({"name": name, "algorithm": algorithm, "status": "pending", "units": {}})
        return stages[index]

    def set_stage_status(self, index: int, status: str) -> None:
        self.data["stages"][index]["status"] = status

    def record_unit(self, index: int, name: str, record: dict) -> None:
        self.data["stages"][index]["units"][name] = record

    def add_pass_seconds(self, index: int, seconds: float) -> None:
        """Add to a layerwise stage's calibration-pass time (block forwards and Hessians), over all runs."""
        stage = self.data["stages"][index]
        stage["pass_seconds"] = round(stage.get("pass_seconds", 0.0) + seconds, 3)

    def units(self, index: int) -> dict[str, dict]:
        stages = self.data["stages"]
        return stages[index]["units"] if index < len(stages) else {}

    # -- integrity ----------------------------------------------------------------------------
    def unit_problem(self, index: int, name: str) -> str | None:
        """None if the unit is done and all its files match their recorded sha256; else why not."""
        record = self.units(index).get(name)
        if record is None or record.get("status") != "done":
            return "not done"
        return self.files_problem(record.get("files", {}))

    def stats(self, index: int) -> dict | None:
        """The stage's statistics checkpoint (sensitivities, Hessians): what is done and its files."""
        stages = self.data["stages"]
        return stages[index].get("stats") if index < len(stages) else None

    def record_stats(self, index: int, record: dict) -> None:
        self.data["stages"][index]["stats"] = record

    def files_problem(self, files: dict[str, dict]) -> str | None:
        """None if every file exists with its recorded size and sha256; else what is wrong with the first bad one."""
        for rel, meta in files.items():
            path = self.job_dir / rel
            if not path.exists():
                return f"{rel} is missing"
            if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                return f"{rel} is corrupt (sha256 mismatch)"
        return None
