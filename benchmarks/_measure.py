"""What the benchmarks that run each step in a child process (`skm_vs_coremltools.py`,
`gptq_vs_coremltools.py`) share.

Peak-memory measurement: the child's own peak over a timed call (`PeakMemory`), and the parent's sampler of
the child's process tree (`TreeSampler`).

The rest of the plumbing, parameterised where the two scripts differ: in the child, `child_main` (load the
model, run the step the script names, evaluate, write the result), `calibration`, `warm_up` (numba's kernels,
untimed), `timed` (the one timed call under `PeakMemory`) and `fingerprints`; in the parent, `run_child` (one
step in a child process started by re-running the script with `--child`, sampled by a `TreeSampler`),
`describe` (a step's progress line), `fill_defaults` (QUICK / FULL), `start_run` (clock, `work_dir`: --work-dir
or a temporary directory, `machine_facts` printed), `table_head` / `failed_row` / `fmt` (the markdown tables),
`against` (our rows beside Core ML Tools'), `finish` (whole run's seconds, `write_out`: --out JSON, clean-up)."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

GB = 1e9

SAMPLE_INTERVAL_S = 0.05
RESCAN_EVERY = 20  # look for new descendant processes once a second


def _status_kb(field: str, pid: str = "self") -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _descendants(root: int) -> list[int]:
    """Pids of every live process below `root` (by scanning /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class PeakMemory:
    """Peak RSS of this process over a `with` block, and a marker for the parent's sampler of its descendants.

    This process: the kernel's VmHWM, reset at entry (/proc/self/clear_refs) so it covers the block only,
    read at exit; exact. Processes the block starts (Core ML Tools' k-means workers): the parent samples the
    RSS of this process and its descendants while the marker file says "start" (see `TreeSampler`); no
    thread runs here (a sampling thread fights the timed call for the GIL and slowed it measurably).
    Linux only; elsewhere ru_maxrss, which cannot be reset (the whole child's peak).
    """

    marker: Path | None = None  # set by child_main

    def __init__(self) -> None:
        self.linux = Path("/proc/self/status").exists()
        self.reset = False
        self.start_bytes = 0
        self.self_peak = 0

    def _mark(self, text: str) -> None:
        if self.marker is not None:
            self.marker.write_text(text)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.linux:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                pass
            self.start_bytes = _status_kb("VmRSS") * 1024
        self._mark("start")
        return self

    def __exit__(self, *exc) -> None:
        self._mark("end")
        if self.linux:
            self.self_peak = _status_kb("VmHWM") * 1024
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            self.self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def as_dict(self) -> dict:
        return {"peak_rss_bytes": self.self_peak, "self_peak_rss_bytes": self.self_peak,
                "rss_at_start_bytes": self.start_bytes, "high_water_mark_reset": self.reset}


class TreeSampler:
    """In the parent: the largest sum of RSS over a child and its descendants, sampled every
    SAMPLE_INTERVAL_S while the child's marker file says "start" (new descendants looked for once a second)."""

    def __init__(self, pid: int, marker: Path) -> None:
        self.pid, self.marker = pid, marker
        self.enabled = Path(f"/proc/{pid}/statm").exists()
        self.peak = 0
        self.max_processes = 0
        self._tick = 0
        self._others: list[int] = []

    def sample(self) -> None:
        if not self.enabled:
            return
        try:
            active = self.marker.read_text() == "start"
        except OSError:
            active = False
        if not active:
            return
        if self._tick % RESCAN_EVERY == 0:  # a /proc scan costs milliseconds; reading known pids' RSS, microseconds
            self._others = _descendants(self.pid)
        self._tick += 1
        self.max_processes = max(self.max_processes, 1 + len(self._others))
        self.peak = max(self.peak, _rss_bytes(self.pid) + sum(_rss_bytes(p) for p in self._others))


# --------------------------------------------------------------------------------------------- children

def _ru_maxrss_kb() -> dict:
    import resource

    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}



def child_main(spec_path: str, sensitivity: Callable[[dict, object, object], dict],
               compress: Callable[[dict, object, object], dict]) -> None:
    """One step in this process; writes its result (JSON) to spec['result']. spec['step'] is "float" (the
    model as loaded), "sensitivity" (`sensitivity(spec, model, tokenizer)`, not evaluated) or any other
    (`compress(spec, model, tokenizer)`, evaluated on its "model" if it returns one)."""
    spec = json.loads(Path(spec_path).read_text())
    PeakMemory.marker = Path(spec["marker"])
    import torch

    from llmpalette.sources.models import load_model, quiet_libraries

    quiet_libraries()
    result: dict = {"spec": spec}
    start = time.perf_counter()
    model, tokenizer = load_model("default", dtype=torch.float32)
    result["load_seconds"] = time.perf_counter() - start
    step = spec["step"]
    if step == "float":
        with PeakMemory() as memory:
            pass
        result.update(memory.as_dict())
    elif step == "sensitivity":
        result.update(sensitivity(spec, model, tokenizer))
    else:
        result.update(compress(spec, model, tokenizer))
    if step != "sensitivity":
        from llmpalette.evaluate.perplexity import perplexity
        from llmpalette.sources.text import build_windows

        windows = build_windows(tokenizer, "default", seq_len=spec["seq_len"], calibration_samples=0,
                                evaluation_windows=spec["eval_windows"])
        start = time.perf_counter()
        result["perplexity"] = perplexity(result.pop("model", model), windows.evaluation, batch_size=4)
        result["eval_seconds"] = time.perf_counter() - start
        result["text"] = windows.description
    result["child_ru_maxrss_kb"] = _ru_maxrss_kb()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def calibration(tokenizer, spec: dict) -> list:
    """The first spec['samples'] calibration windows of spec['seq_len'] tokens of the default text."""
    from llmpalette.sources.text import calibration_windows

    return [w for _, w in calibration_windows(tokenizer, "default", seq_len=spec["seq_len"], count=spec["samples"])]


def warm_up(model, skipped: tuple[str, ...], rows: int, kernel: Callable) -> float:
    """Seconds `kernel(weight)` takes on a copy of the first `rows` rows of the first Linear weight not in
    `skipped`: run before the timed call, so numba's compile or cache load is not timed."""
    import torch

    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in skipped)
    weight = model.get_submodule(name).weight.detach()[:rows].clone()
    start = time.perf_counter()
    kernel(weight)
    return time.perf_counter() - start


def timed(call: Callable[[], object]) -> tuple[object, float, dict]:
    """`call()` alone under `PeakMemory`: its value, its seconds and the memory figures (`PeakMemory.as_dict`)."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        value = call()
        seconds = time.perf_counter() - start
    return value, seconds, memory.as_dict()


def fingerprints(model, skipped: tuple[str, ...] = (), embeddings: bool = False) -> dict[str, tuple[float, float]]:
    """(sum, sum of squares) of each Linear weight (and Embedding weight if `embeddings`) not named in
    `skipped`: tells which layers a tool changed (a layer skipped silently would show) without copying the weights."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding) if embeddings else (torch.nn.Linear,)
    found = {}
    for n, m in model.named_modules():
        if isinstance(m, kinds) and n not in skipped:
            w = m.weight.detach().double()
            found[n] = (float(w.sum()), float(w.square().sum()))
    return found


# ----------------------------------------------------------------------------------------------- parent

def child_spec(spec: dict, work: Path, label: str) -> dict:
    """The spec `run_child` hands the child: `spec` plus where it writes its result and its phase marker."""
    return {**spec, "result": str(work / f"{label}.json"), "marker": str(work / f"{label}.phase")}


def run_child(spec: dict, work: Path, label: str, script: Path) -> dict:
    """Run one step in a fresh process (`script --child WORK/<label>.spec.json`); its output goes to
    WORK/<label>.log. Returns its result or an error."""
    spec = child_spec(spec, work, label)
    spec_path = work / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = work / f"{label}.log"
    env = {**os.environ, "COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL": "warning", "TQDM_DISABLE": "1"}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, str(script), "--child", str(spec_path)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(child.pid, Path(spec["marker"]))
        try:
            while child.poll() is None:
                sampler.sample()
                time.sleep(SAMPLE_INTERVAL_S)
        finally:
            if child.poll() is None:  # interrupted: do not leave the child (and its workers) running
                child.terminate()
                child.wait()
        code = child.returncode
    elapsed = time.perf_counter() - start
    if code != 0 or not Path(spec["result"]).exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        print(f"  {label}: FAILED (exit {code}) after {elapsed:.0f} s; last lines of {log_path}:\n{tail}", flush=True)
        return {"error": f"exit {code}", "log_tail": tail, "child_seconds": elapsed, "load_average_before": load}
    result = json.loads(Path(spec["result"]).read_text())
    result["tree_peak_rss_bytes_sampled"] = sampler.peak
    result["max_processes"] = sampler.max_processes
    if "peak_rss_bytes" in result:
        result["peak_rss_bytes"] = max(result["peak_rss_bytes"], sampler.peak)
    result["child_seconds"] = elapsed
    result["load_average_before"] = load
    return result


def describe(label: str, r: dict, eval_seconds: bool = False) -> str:
    """A step's progress line. Optional parts show where the result has them: the load average after
    ("load_average_after"), lm_head/embedding ("skipped_unchanged"), GPTQ's "layer_metrics", "reused";
    `eval_seconds` adds the evaluation's seconds to the perplexity."""
    after = f", after {r['load_average_after']:.2f}" if "load_average_after" in r else ""
    done = "reused (measured earlier): done" if r.get("reused") else "done"
    parts = [f"  {label}: {done} in {r['child_seconds']:.0f} s (model load {r['load_seconds']:.0f} s; "
             f"1-min load average before {r['load_average_before']:.2f}{after})"]
    if "seconds" in r:
        parts.append(f"timed call {r['seconds']:.1f} s")
    if "linear_layers" in r:
        changed = f"{r['linear_layers_changed']}/{r['linear_layers']} linear layers changed"
        if "skipped_unchanged" in r:
            changed += f", lm_head/embedding {'unchanged' if r['skipped_unchanged'] else 'CHANGED'}"
        parts.append(changed)
    if r.get("warm_up_seconds"):
        parts.append(f"numba warm-up {r['warm_up_seconds']:.1f} s")
    if r.get("layer_metrics"):
        parts.append(f"mean output_rel_error {r['layer_metrics'].get('mean_output_rel_error', float('nan')):.4g}")
    parts.append(f"peak RSS {r['peak_rss_bytes'] / GB:.2f} GB ({max(1, r['max_processes'])} process(es))")
    if "perplexity" in r:
        parts.append(f"perplexity {r['perplexity']:.3f}"
                     + (f" (evaluation {r['eval_seconds']:.0f} s)" if eval_seconds else ""))
    return ", ".join(parts)


def machine_facts(packages: tuple[str, ...]) -> dict:
    """Cores, torch's and numba's threads, and the versions of Python and of `packages` (in that order)."""
    import importlib

    import numba
    import torch

    versions = {name: importlib.import_module(name).__version__ for name in packages}  # imported before counting threads
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "numba_threads": numba.get_num_threads(),
            "versions": {"python": sys.version.split()[0], **versions}}


def print_machine(machine: dict) -> None:
    print("## Machine")
    for key, value in machine.items():
        print(f"- {key}: {json.dumps(value)}")


def start_run(path: Path | None, prefix: str, packages: tuple[str, ...]):
    """The parent's start: (the clock, the work directory and its TemporaryDirectory or None (`work_dir`), the
    machine facts (`machine_facts(packages)`, printed)); Core ML Tools' log level set to warning unless set."""
    started = time.perf_counter()
    work, temp = work_dir(path, prefix)
    os.environ.setdefault("COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL", "warning")
    machine = machine_facts(packages)
    print_machine(machine)
    return started, work, temp, machine


def fill_defaults(args, quick: dict, full: dict):
    """Every option left unset (None) gets its value from `quick` (with --quick) or `full`."""
    defaults = quick if args.quick else full
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def work_dir(path: Path | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """`path` (created), or a temporary directory named `prefix`... (returned too: the caller cleans it up)."""
    if path is None:
        temp = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(temp.name), temp
    path.mkdir(parents=True, exist_ok=True)
    return path, None


def fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table_head(heading: str, columns: list[str], align: str) -> None:
    """A markdown table's heading line (e.g. "## Results"), column names and separator; `align`: one letter a
    column, "l" (left) or "r" (right)."""
    print(f"\n{heading}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")


def failed_row(cells: list, error, columns: int) -> str:
    """A table row of `columns` columns: `cells`, then "FAILED: <error>", the rest empty."""
    return "| " + " | ".join(str(c) for c in cells) + f" | FAILED: {error} |" + " |" * (columns - len(cells) - 1)


def against(rows: list[dict], key: str, ours: tuple[str, ...], theirs: str) -> list[tuple[dict, dict]]:
    """(our row, their row): each row of a method in `ours` beside the row of `theirs` with the same `key` column
    and samples, where both are there and neither failed (in the rows' order)."""
    by_key = {(r["method"], r[key], r["samples"]): r for r in rows if not r["error"]}
    return [(r, by_key[(theirs, k, n)]) for (method, k, n), r in by_key.items()
            if method in ours and (theirs, k, n) in by_key]


def write_out(path: Path, data: dict) -> None:
    """The --out JSON."""
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"raw results: {path}")


def finish(started: float, out: Path | None, temp: tempfile.TemporaryDirectory | None, **data) -> None:
    """The parent's end: the whole run's seconds printed; with `out`, the keyword arguments written there as the
    JSON's entries, in their order, "whole_run_seconds" last (`write_out`); the temporary work directory removed."""
    total = time.perf_counter() - started
    print(f"\nwhole run: {total:.0f} s", flush=True)
    if out:
        write_out(out, {**data, "whole_run_seconds": total})
    if temp is not None:
        temp.cleanup()
