"""The job report: perplexity before/after on held-out windows, size before/after, per-layer error.

Reads a finished job (manifest + layer files) and the source model; never recompresses anything.
Writes report.json (everything), report.md (for people) and report.png (per-layer error).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmpalette.jobs.compressed import apply_job
from llmpalette.jobs.files import atomic_write_bytes, atomic_write_text
from llmpalette.jobs.manifest import Manifest
from llmpalette.recipe import DTYPES
from llmpalette.evaluate.perplexity import perplexity
from llmpalette.modules import parameter_bytes
from llmpalette.sources.models import load_model
from llmpalette.sources.text import build_windows

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"


def build_report(job_dir: str | Path, *, progress: bool = True, loaded: tuple | None = None) -> dict[str, Any]:
    """Evaluate a finished job and write report.json / report.md / report.png into it.

    `loaded`: (model, tokenizer) of the job's float source model, if the caller has them already;
    the model's compressed weights are overwritten by the job's decoded ones.
    """
    job_dir = Path(job_dir)
    manifest = Manifest.load(job_dir)
    recipe = manifest.data["recipe"]
    model, tokenizer = loaded or load_model(recipe["model"], dtype=DTYPES[recipe["dtype"]])
    baseline_bytes = parameter_bytes(model, 2)
    evaluation: dict[str, Any] = {"windows": recipe["evaluate"]["windows"], "seq_len": recipe["evaluate"]["seq_len"]}
    windows = None
    if evaluation["windows"] > 0:
        text = build_windows(tokenizer, recipe["data"]["text"], seq_len=evaluation["seq_len"], calibration_samples=0, evaluation_windows=evaluation["windows"])
        windows = text.evaluation
        evaluation["text"] = text.description
        started = time.perf_counter()
        evaluation["perplexity_before"] = perplexity(model, windows, batch_size=recipe["evaluate"]["batch_size"], progress=progress, desc="perplexity (float)")
        evaluation["seconds_before"] = round(time.perf_counter() - started, 2)
    apply_job(model, manifest)
    if windows is not None:
        started = time.perf_counter()
        evaluation["perplexity_after"] = perplexity(model, windows, batch_size=recipe["evaluate"]["batch_size"], progress=progress, desc="perplexity (compressed)")
        evaluation["seconds_after"] = round(time.perf_counter() - started, 2)
        evaluation["perplexity_ratio"] = evaluation["perplexity_after"] / evaluation["perplexity_before"]
    layers = _layers(manifest)
    compressed_fp16 = sum(layer["fp16_bytes"] for layer in layers)
    after_bytes = baseline_bytes - compressed_fp16 + sum(layer["nbytes"] for layer in layers)
    report = {
        "job_dir": str(job_dir),
        "model": manifest.data["model"],
        "recipe_sha256": manifest.data["recipe_sha256"],
        "stages": [{"name": s["name"], "algorithm": s["algorithm"], "config": r["config"]} for s, r in zip(manifest.data["stages"], recipe["stages"])],
        "world_size": manifest.data["world_size"],
        "evaluation": evaluation,
        "size": {
            "float16_bytes": baseline_bytes,
            "compressed_bytes": after_bytes,
            "compression_ratio_vs_float16": baseline_bytes / after_bytes,
            "compressed_layers": len(layers),
            "note": "float16 baseline counts every distinct parameter at 2 bytes; compressed = LUTs + packed indices + scales of the compressed layers, other parameters at 2 bytes",
        },
        "compression_seconds": round(sum(layer["seconds"] for layer in layers), 2),
        "layers": layers,
    }
    atomic_write_text(job_dir / REPORT_JSON, json.dumps(report, indent=1) + "\n")
    atomic_write_text(job_dir / REPORT_MD, format_report(report))
    atomic_write_bytes(job_dir / REPORT_PNG, plot_layer_errors(layers, title=f"{job_dir.name}: per-layer relative squared error"))
    return report


def _layers(manifest: Manifest) -> list[dict[str, Any]]:
    index = len(manifest.data["stages"]) - 1
    rows = []
    for name, record in manifest.units(index).items():
        config = record["config"]
        rows.append({
            "name": name,
            "tied_names": record["names"][1:],
            "shape": record["shape"],
            "n_bits": config["n_bits"],
            "granularity": config["granularity"],
            "group_size": config["group_size"],
            "cluster_dim": config["cluster_dim"] or 1,
            **record["metrics"],
        })
    return rows


def format_report(report: dict[str, Any]) -> str:
    ev, size = report["evaluation"], report["size"]
    lines = [f"# llmpalette report: {report['job_dir']}", ""]
    model = report["model"]
    lines.append(f"- model: `{model.get('spec')}` ({model.get('kind')})")
    for stage in report["stages"]:
        lines.append(f"- stage `{stage['name']}`: `{json.dumps(stage['config'])}`")
    lines.append(f"- ranks: {report['world_size']}; compression time (sum over layers): {report['compression_seconds']} s")
    lines.append("")
    lines.append("## Quality")
    if "perplexity_after" in ev:
        text = ev["text"]
        lines += [
            f"Held-out perplexity on {ev['windows']} windows of {ev['seq_len']} tokens from `{text.get('source')}` "
            f"({text.get('rule')}):",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| float (before) | {ev['perplexity_before']:.3f} |",
            f"| compressed (after) | {ev['perplexity_after']:.3f} |",
            f"| ratio after/before | {ev['perplexity_ratio']:.4f} |",
        ]
    else:
        lines.append("Not evaluated (evaluate.windows is 0).")
    lines += [
        "",
        "## Size",
        "",
        "| | bytes |",
        "|---|---|",
        f"| float16 | {size['float16_bytes']:,} |",
        f"| compressed | {size['compressed_bytes']:,} |",
        f"| compression ratio vs float16 | {size['compression_ratio_vs_float16']:.3f} |",
        "",
    ]
    grown = [layer["name"] for layer in report["layers"] if layer["nbytes"] >= layer["fp16_bytes"]]
    if grown:
        lines += [
            f"**Warning:** {len(grown)} layer(s) are not smaller than in float16 (e.g. `{grown[0]}`): their LUTs "
            "outweigh the indices they save. Use larger groups, fewer bits, or lut_dtype float16 / int8.",
            "",
        ]
    lines += [
        "## Layers",
        "",
        "| layer | shape | bits | granularity | group | rel. sq. error | bytes | float16 bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in report["layers"]:
        name = layer["name"] + (f" (= {', '.join(layer['tied_names'])})" if layer["tied_names"] else "")
        lines.append(
            f"| {name} | {'x'.join(map(str, layer['shape']))} | {layer['n_bits']} | {layer['granularity']} | "
            f"{layer['group_size'] or ''} | {layer['rel_sq_error']:.3e} | {layer['nbytes']:,} | {layer['fp16_bytes']:,} |"
        )
    lines.append("")
    lines.append(f"![per-layer error]({REPORT_PNG})")
    return "\n".join(lines) + "\n"


def plot_layer_errors(layers: list[dict[str, Any]], *, title: str) -> bytes:
    """PNG bytes: per-layer relative squared error, one bar per layer in model order."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.06 * len(layers) + 4), 4), dpi=100)
    errors = [layer["rel_sq_error"] for layer in layers]
    kinds = [layer["name"].rsplit(".", 1)[-1] for layer in layers]  # q_proj, down_proj, ...
    palette = plt.get_cmap("tab10")
    colours = {kind: palette(i % 10) for i, kind in enumerate(dict.fromkeys(kinds))}
    ax.bar(range(len(errors)), errors, color=[colours[k] for k in kinds], width=0.8)
    ax.set_yscale("log" if errors and min(errors) > 0 else "linear")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("||W - W_hat||² / ||W||²")
    ax.set_title(title, fontsize=9)
    if len(layers) <= 40:
        ax.set_xticks(range(len(layers)), [layer["name"] for layer in layers], rotation=90, fontsize=6)
    if 1 < len(colours) <= 10:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=k) for k, c in colours.items()], fontsize=7, ncols=min(4, len(colours)))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def read_report(job_dir: str | Path) -> dict[str, Any] | None:
    path = Path(job_dir) / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
