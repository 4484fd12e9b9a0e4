"""The job report: perplexity before/after on held-out windows, size before/after, per-layer error, times.

Reads a finished job (manifest + layer files) and the source model; never recompresses anything.
Without the evaluation (`evaluate=False`, the CLI's --no-eval) it holds the compression figures only:
sizes, per-layer errors and the compression time, all read from the manifest (the model is loaded
for its parameter count, the whole-model sizes and its architecture).
The job is verified (every stage done, every layer file intact) before the model is loaded, so a bad
job fails in a second. The float model's perplexity is cached in the job (eval_cache.json), so a
second report only evaluates the compressed model.
Writes report.json (everything), report.md (for people) and report.png (per-layer error by block).
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpalette.evaluate.perplexity import perplexity
from llmpalette.jobs.compressed import Weights, apply_weights, compressed_weights, job_tokenizer
from llmpalette.jobs.files import atomic_write_bytes, atomic_write_text, sha256_bytes
from llmpalette.jobs.manifest import Manifest
from llmpalette.jobs.runner import fingerprint
from llmpalette.modules import parameter_bytes
from llmpalette.recipe import DTYPES
from llmpalette.sources.models import DEFAULT_MODEL, DEFAULT_PACKAGE, load_model
from llmpalette.sources.text import build_windows

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
EVAL_CACHE = "eval_cache.json"
EVAL_CACHE_FORMAT = "llmpalette-eval-cache/1"
# perplexity_after / perplexity_before at or above which the report says quality degraded / collapsed.
DEGRADED_RATIO, COLLAPSED_RATIO = 1.5, 10.0
NO_TOKENIZER = "no tokenizer: the model has none; pass --tokenizer (or `tokenizer:` in the recipe) to evaluate"
NO_WINDOWS = "evaluate.windows is 0"
NO_EVAL = "skipped with --no-eval"


def build_report(job_dir: str | Path, *, progress: bool = True, loaded: tuple | None = None,
                 evaluate: bool = True) -> dict[str, Any]:
    """Evaluate a finished job and write report.json / report.md / report.png into it.

    Args:
        job_dir: a job directory whose stages are all done.
        progress: show progress bars while evaluating.
        loaded: (model, tokenizer) of the job's float source model, if the caller has them already;
            the tokenizer may be None (then perplexity is not measured). When perplexity is measured,
            the model's compressed weights are overwritten by the job's decoded ones.
        evaluate: measure perplexity (the float model's from the job's cache when it has it). False
            writes the report from the compression figures only; `needs_evaluation` then says so.

    Raises JobError, before loading or evaluating anything, if a stage is unfinished or a layer file
    is missing or corrupt.

    Example:
        >>> report = build_report("jobs/default")
        >>> report["evaluation"]["perplexity_ratio"], report["size"]["compression_ratio_vs_float16"]
    """
    job_dir = Path(job_dir)
    manifest = Manifest.load(job_dir)
    weights = compressed_weights(manifest)
    recipe = manifest.data["recipe"]
    model, tokenizer = loaded or load_model(recipe["model"], dtype=DTYPES[recipe["dtype"]], tokenizer=job_tokenizer(job_dir, recipe))
    baseline_bytes = parameter_bytes(model, 2)
    parameters = parameter_bytes(model, 1)
    evaluation = _evaluate(model, tokenizer, weights, manifest, progress, evaluate)
    layers = _layers(manifest)
    report = {
        "job_dir": str(job_dir),
        "model": manifest.data["model"],
        "model_name": model_name(manifest.data["model"]),
        "architecture": _architecture(model),
        "parameters": parameters,
        "recipe_sha256": manifest.data["recipe_sha256"],
        "stages": [_stage(s, r) for s, r in zip(manifest.data["stages"], recipe["stages"])],
        "world_size": manifest.data["world_size"],
        "evaluation": evaluation,
        "size": _sizes(baseline_bytes, layers),
        **compression_time(manifest),
        "layers": layers,
    }
    atomic_write_text(job_dir / REPORT_JSON, json.dumps(report, indent=1) + "\n")
    atomic_write_text(job_dir / REPORT_MD, format_report(report))
    atomic_write_bytes(job_dir / REPORT_PNG, plot_layer_errors(layers, title=f"{job_dir.name}: relative squared error per layer, by decoder block"))
    return report


def _stage(stage: dict[str, Any], recipe_stage: dict[str, Any]) -> dict[str, Any]:
    """A stage as the report shows it: name, algorithm, config and, for a calibrated stage, what it read."""
    out = {"name": stage["name"], "algorithm": stage["algorithm"], "config": recipe_stage["config"]}
    stats = stage.get("stats")
    if stats:
        out["calibration"] = {"statistic": stats["kind"], "samples": stats["samples"], "shard_size": stats["shard_size"],
                              "seconds": stats["seconds"]}
    return out


def compression_time(manifest: Manifest) -> dict[str, float]:
    """The compute seconds the job records, summed over its runs (model loading and evaluation are not in them).

    sensitivities_seconds: the stages' Fisher passes, wall time on rank 0; passes_seconds: the layerwise
    stages' calibration passes (block forwards and Hessians, rank 0's wall time less its own layers' maths);
    layers_seconds: every compressed layer's own time, whichever rank or thread did it (so, with several, more than
    the wall time they took); compression_seconds: the three together.
    """
    stages = manifest.data["stages"]
    sensitivities = sum(stage["stats"]["seconds"] for stage in stages if stage.get("stats"))
    passes = sum(stage.get("pass_seconds", 0.0) for stage in stages)
    layers = sum(unit["metrics"]["seconds"] for stage in stages for unit in stage["units"].values())
    return {"compression_seconds": round(sensitivities + passes + layers, 2), "sensitivities_seconds": round(sensitivities, 2),
            "passes_seconds": round(passes, 2), "layers_seconds": round(layers, 2)}


def compression_time_line(times: dict[str, Any]) -> str:
    """`compression time 708.6 s (sensitivities 560.3 s + layers 148.3 s)`, from `compression_time`'s figures."""
    if "layers_seconds" not in times:  # a report written before the times were split
        return f"compression time {times['compression_seconds']:.1f} s (sum over layers)"
    parts = [f"{label} {times[key]:.1f} s" for key, label in
             (("sensitivities_seconds", "sensitivities"), ("passes_seconds", "calibration passes")) if times.get(key)]
    if not parts:
        return f"compression time {times['compression_seconds']:.1f} s (layers; no sensitivity pass)"
    return f"compression time {times['compression_seconds']:.1f} s ({' + '.join(parts)} + layers {times['layers_seconds']:.1f} s)"


def needs_evaluation(report: dict[str, Any]) -> bool:
    """Whether the report was written without its evaluation (--no-eval), which a later report can add."""
    return report["evaluation"].get("reason") == NO_EVAL


def _evaluate(model: nn.Module, tokenizer, weights: Weights, manifest: Manifest, progress: bool,
              evaluate: bool) -> dict[str, Any]:
    """Perplexity of the float model (cached in the job), then of the model with the job's weights applied."""
    recipe = manifest.data["recipe"]
    spec = recipe["evaluate"]
    evaluation: dict[str, Any] = {"windows": spec["windows"], "seq_len": spec["seq_len"]}
    reason = (NO_WINDOWS if spec["windows"] == 0 else NO_EVAL if not evaluate
              else NO_TOKENIZER if tokenizer is None else None)
    if reason:
        return {**evaluation, "measured": False, "reason": reason, "verdict": None}
    text = build_windows(tokenizer, recipe["data"]["text"], seq_len=spec["seq_len"], calibration_samples=0, evaluation_windows=spec["windows"])
    windows = text.evaluation  # [windows, seq_len]
    evaluation.update(measured=True, text=text.description)
    evaluation.update(_float_perplexity(model, windows, manifest, text.description, progress))
    apply_weights(model, weights, manifest.job_dir)
    started = time.perf_counter()
    evaluation["perplexity_after"] = perplexity(model, windows, batch_size=spec["batch_size"], progress=progress, desc="perplexity (compressed)")
    evaluation["seconds_after"] = round(time.perf_counter() - started, 2)
    evaluation["perplexity_ratio"] = evaluation["perplexity_after"] / evaluation["perplexity_before"]
    evaluation["verdict"] = quality_verdict(evaluation)
    return evaluation


def _float_perplexity(model: nn.Module, windows: torch.Tensor, manifest: Manifest, description: dict[str, Any], progress: bool) -> dict[str, Any]:
    """perplexity_before and seconds_before: from the job's cache when the key matches, else measured and cached."""
    key = _cache_key(manifest, description, windows)
    cached = _read_cache(manifest.job_dir, key)
    if cached is not None:
        return {"perplexity_before_cached": True, **cached}
    started = time.perf_counter()
    before = perplexity(model, windows, batch_size=manifest.data["recipe"]["evaluate"]["batch_size"], progress=progress, desc="perplexity (float)")
    result = {"perplexity_before": before, "seconds_before": round(time.perf_counter() - started, 2)}
    _write_cache(manifest.job_dir, key, result)
    return {"perplexity_before_cached": False, **result}


# -- the float perplexity, cached in the job ---------------------------------------------------------
def _cache_key(manifest: Manifest, description: dict[str, Any], windows: torch.Tensor) -> dict[str, Any]:
    """What the float perplexity depends on: the model (not where it lies), its dtype, and the exact tokens.

    The tokens are keyed by their sha256 rather than the tokenizer's name, which is a path that differs
    between the source model's tokenizer and the job's saved copy of it. batch_size changes nothing.
    """
    return {
        "model": fingerprint(manifest.data["model"]),
        "dtype": manifest.data["recipe"]["dtype"],
        "text": {"source": description["source"], "rule": description["rule"]},
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "tokens_sha256": sha256_bytes(windows.contiguous().numpy().astype("<i8").tobytes()),
    }


def _read_cache(job_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached float results for `key`, or None; an unreadable cache is only a miss (it is recomputable)."""
    for entry in _cache_entries(job_dir):
        if _canonical(entry.get("key")) == _canonical(key):
            return entry["result"]
    return None


def _write_cache(job_dir: Path, key: dict[str, Any], result: dict[str, Any]) -> None:
    entries = [e for e in _cache_entries(job_dir) if _canonical(e.get("key")) != _canonical(key)]
    entries.append({"key": key, "result": result})
    atomic_write_text(job_dir / EVAL_CACHE, json.dumps({"format": EVAL_CACHE_FORMAT, "entries": entries}, indent=1) + "\n")


def _cache_entries(job_dir: Path) -> list[dict[str, Any]]:
    path = job_dir / EVAL_CACHE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != EVAL_CACHE_FORMAT:
        return []
    return [e for e in data.get("entries", []) if isinstance(e, dict) and "key" in e and "result" in e]


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


# -- what the report says -----------------------------------------------------------------------------
def quality_verdict(evaluation: dict[str, Any]) -> str | None:
    """One sentence when the compressed model's perplexity grew too much; None when fine or not measured.

    perplexity_after / perplexity_before >= COLLAPSED_RATIO: the model is not usable;
    >= DEGRADED_RATIO: noticeably worse. A non-finite perplexity after compression counts as collapsed.
    """
    before, after = evaluation.get("perplexity_before"), evaluation.get("perplexity_after")
    if before is None or after is None or not math.isfinite(before):
        return None
    ratio = after / before if math.isfinite(after) else math.inf
    change = f"perplexity {_figure(before)} -> {_figure(after)}"
    if ratio >= COLLAPSED_RATIO:
        return (f"quality collapsed: {change} ({_figure(ratio)}x the float model); the compressed model is not usable. "
                "Try more bits (4 or 8), smaller groups (group_size / block_size), or a calibration-based algorithm "
                "(algorithm: skm for LUTs, algorithm: gptq for LUTs or integers)")
    if ratio >= DEGRADED_RATIO:
        return (f"quality degraded noticeably: {change} ({ratio:.3g}x the float model); consider more bits, "
                "smaller groups (group_size / block_size), or a calibration-based algorithm (algorithm: skm for LUTs, "
                "algorithm: gptq for LUTs or integers)")
    return None


def _figure(value: float) -> str:
    """4 significant digits, with thousands separators from 1,000 on: 25.08, 947, 23,750."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def model_name(identity: dict[str, Any]) -> str:
    """A person's name for the model of a manifest's identity: the GGUF file, the folder, or the hub id."""
    kind = identity.get("kind")
    if kind == "gguf":
        if identity.get("spec") == DEFAULT_MODEL:
            return f"{identity['file']} (the embedded default model, from the {DEFAULT_PACKAGE.replace('_', '-')} wheel)"
        return identity["file"]
    if kind == "folder":
        return Path(identity["location"]).name
    if kind == "hub":
        commit = identity.get("commit")
        return identity["id"] + (f" (commit {commit[:12]})" if commit else "")
    return str(identity.get("spec"))


def _architecture(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    model_type = getattr(config, "model_type", None)
    return architectures[0] + (f" ({model_type})" if model_type else "")


def _sizes(baseline_bytes: int, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole model and compressed layers only, both against float16; the rest counts 2 bytes a value in both."""
    layers_fp16 = sum(layer["fp16_bytes"] for layer in layers)
    layers_bytes = sum(layer["nbytes"] for layer in layers)
    compressed_bytes = baseline_bytes - layers_fp16 + layers_bytes
    return {
        "float16_bytes": baseline_bytes,
        "compressed_bytes": compressed_bytes,
        "compression_ratio_vs_float16": baseline_bytes / compressed_bytes,
        "compressed_layers": len(layers),
        "compressed_layers_float16_bytes": layers_fp16,
        "compressed_layers_bytes": layers_bytes,
        "compressed_layers_ratio": layers_fp16 / layers_bytes if layers_bytes else None,
        "note": "float16 baseline counts every distinct parameter at 2 bytes; compressed = LUTs + packed indices + scales + outliers (int32 position + float16 value each) of the compressed layers, other parameters at 2 bytes",
    }


def _layers(manifest: Manifest) -> list[dict[str, Any]]:
    index = len(manifest.data["stages"]) - 1
    rows = []
    for name, record in manifest.units(index).items():
        config = record["config"]
        rows.append({
            "name": name,
            "tied_names": record["names"][1:],
            "module_type": record.get("module_type"),
            "shape": record["shape"],
            "n_bits": _bits(config),
            "granularity": config["granularity"],
            "group_size": config.get("group_size") or config.get("block_size"),  # a LUT's channels, or a grid's block
            "cluster_dim": config.get("cluster_dim") or 1,
            **({"configured_dampening": config["hessian_dampening"]} if "hessian_dampening" in config else {}),
            **record["metrics"],
        })
    return rows


def _bits(config: dict[str, Any]) -> int:
    """A unit's bits: a LUT's `n_bits`, or the width of a linear quantizer's `weight_dtype` (`int4` -> 4)."""
    if "n_bits" in config:
        return config["n_bits"]
    digits = re.search(r"(\d+)$", str(config.get("weight_dtype", "")))
    return int(digits.group(1)) if digits else 0


# Per-layer metrics shown as columns of report.md when any layer has them: (key, header, explanation).
OPTIONAL_COLUMNS = (
    ("fisher_rel_sq_error", "Fisher-weighted rel. sq. error",
     "Fisher-weighted: each term weighted by the weight's sensitivity, the error the loss sees."),
    ("output_rel_error", "output rel. error",
     "Output relative error: ||(W - W_hat) X^T||^2 / ||W X^T||^2 on the calibration inputs, what GPTQ minimises."),
    ("kmeans_output_rel_error", "k-means start output rel. error",
     "k-means start: the same output error of LUT-GPTQ's starting point (weighted k-means), before GPTQ's error feedback."),
)


def format_report(report: dict[str, Any]) -> str:
    ev, size = report["evaluation"], report["size"]
    lines = [f"# llmpalette report: {report['job_dir']}", ""]
    lines.append(f"- model: {_model_line(report)}")
    for stage in report["stages"]:
        lines.append(f"- stage `{stage['name']}`: `{json.dumps(stage['config'])}`")
        if "calibration" in stage:
            c = stage["calibration"]
            lines.append(f"  - {c['statistic']} sensitivities from {c['samples']} calibration samples "
                         f"(shards of {c['shard_size']}) in {c['seconds']} s (across runs, if the job was resumed)")
    lines.append(f"- ranks: {report['world_size']}; {compression_time_line(report)}")
    lines.append("  - the compute time the job records, over all its runs: the sensitivity pass's wall time and the "
                 "sum of every layer's own time (whichever rank did it); model loading and evaluation not included")
    lines += ["", "## Quality", ""]
    if "perplexity_after" in ev:
        text = ev["text"]
        cached = " (cached from an earlier report)" if ev.get("perplexity_before_cached") else ""
        lines += [
            f"Held-out perplexity on {ev['windows']} windows of {ev['seq_len']} tokens from `{text.get('source')}` "
            f"({text.get('rule')}):",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| float (before){cached} | {ev['perplexity_before']:.3f} |",
            f"| compressed (after) | {ev['perplexity_after']:.3f} |",
            f"| ratio after/before | {ev['perplexity_ratio']:.4f} |",
        ]
        verdict = ev.get("verdict", quality_verdict(ev))
        if verdict:
            lines += ["", f"**{verdict}**"]
    elif needs_evaluation(report):
        lines.append(f"Perplexity: not measured ({NO_EVAL}; `llmpalette report {report['job_dir']}` measures it).")
    else:
        lines.append(f"Perplexity: not measured ({ev.get('reason', NO_WINDOWS)}).")
    lines += ["", "## Size", "", "| | float16 bytes | compressed bytes | ratio |", "|---|---|---|---|",
              f"| whole model | {size['float16_bytes']:,} | {size['compressed_bytes']:,} | {size['compression_ratio_vs_float16']:.3f} |"]
    if "compressed_layers_bytes" in size:
        rest = size["float16_bytes"] - size["compressed_layers_float16_bytes"]
        layers_ratio = size["compressed_layers_ratio"]
        lines += [
            f"| compressed layers only ({size['compressed_layers']}) | {size['compressed_layers_float16_bytes']:,} | "
            f"{size['compressed_layers_bytes']:,} | {'' if layers_ratio is None else f'{layers_ratio:.3f}'} |",
            f"| everything else (kept in float16) | {rest:,} | {rest:,} | 1.000 |",
        ]
    lines.append("")
    grown = [layer["name"] for layer in report["layers"] if layer["nbytes"] >= layer["fp16_bytes"]]
    if grown:
        lines += [
            f"**Warning:** {len(grown)} layer(s) are not smaller than in float16 (e.g. `{grown[0]}`): their LUTs "
            "outweigh the indices they save. Use larger groups, fewer bits, or lut_dtype float16 / int8.",
            "",
        ]
    optional = [(key, header, explanation) for key, header, explanation in OPTIONAL_COLUMNS
                if any(key in layer for layer in report["layers"])]
    outliers = any(layer.get("outliers") for layer in report["layers"])
    extra = "".join(f" {header} |" for _, header, _ in optional) + (" outliers |" if outliers else "")
    explained = ["Relative squared error: sum (W - W_hat)^2 / sum W^2.", *(e for _, _, e in optional)]
    lines += [
        "## Layers",
        "",
        " ".join(explained),
        "",
    ]
    notes = [f"- `{layer['name']}`: {layer['fallback']}" for layer in report["layers"] if "fallback" in layer]
    notes += [f"- `{layer['name']}`: GPTQ raised the Hessian dampening to {layer['dampening']:g} (the Hessian was singular)"
              for layer in report["layers"] if layer.get("dampening", 0) > layer.get("configured_dampening", float("inf"))]
    if notes:
        lines += ["Fallbacks:", "", *notes, ""]
    lines += [
        f"| layer | shape | bits | granularity | group | rel. sq. error |{extra} bytes | float16 bytes |",
        "|---|---|---|---|---|---|" + "---|" * (len(optional) + outliers) + "---|---|",
    ]
    for layer in report["layers"]:
        name = layer["name"] + (f" (= {', '.join(layer['tied_names'])})" if layer["tied_names"] else "")
        cells = "".join(f" {layer.get(key, float('nan')):.3e} |" for key, _, _ in optional) + (
            f" {layer.get('outliers', 0):,} |" if outliers else "")
        lines.append(
            f"| {name} | {'x'.join(map(str, layer['shape']))} | {layer['n_bits']} | {layer['granularity']} | "
            f"{layer['group_size'] or ''} | {layer['rel_sq_error']:.3e} |{cells} {layer['nbytes']:,} | {layer['fp16_bytes']:,} |"
        )
    lines.append("")
    lines.append(f"![per-layer error by block]({REPORT_PNG})")
    return "\n".join(lines) + "\n"


def _model_line(report: dict[str, Any]) -> str:
    if "model_name" not in report:
        return f"`{report['model'].get('spec')}` ({report['model'].get('kind')})"
    parameters = report["parameters"]
    return (f"{report['model_name']}: {report['architecture']}, {parameters:,} parameters "
            f"({parameters / 1e6:.1f} M); spec `{report['model'].get('spec')}` ({report['model'].get('kind')})")


# -- the plot -------------------------------------------------------------------------------------------
OTHER_GROUP = "other"
_BLOCK = re.compile(r"\.(\d+)\.")


def layer_block(name: str) -> int | None:
    """The decoder block a layer belongs to: the first integer in its dotted name (None for e.g. lm_head)."""
    match = _BLOCK.search(f".{name}.")
    return int(match.group(1)) if match else None


def plot_layer_errors(layers: list[dict[str, Any]], *, title: str) -> bytes:
    """PNG bytes: relative squared error per layer, x = decoder block, one marker per layer kind within a block.

    Layers outside the numbered blocks (lm_head, embeddings) share one group, "other", at the right.
    The same layers give the same bytes (Agg, no software/date metadata).
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups, xs = _plot_positions(layers)
    kinds = list(dict.fromkeys(_kind(layer["name"]) for layer in layers))
    palette = plt.get_cmap("tab10")
    colours = {k: palette(i % 10) for i, k in enumerate(kinds)}
    width = min(20.0, max(6.0, 2 + 0.3 * len(groups)))  # inches
    fig, ax = plt.subplots(figsize=(width, 4), dpi=100, layout="constrained")
    for k in kinds:
        mine = [i for i, layer in enumerate(layers) if _kind(layer["name"]) == k]
        ax.plot([xs[i] for i in mine], [layers[i]["rel_sq_error"] for i in mine], linestyle="none", marker="o", markersize=4, color=colours[k])
    errors = [layer["rel_sq_error"] for layer in layers]
    ax.set_yscale("log" if errors and min(errors) > 0 else "linear")
    step = max(1, math.ceil(len(groups) / 40))
    ax.set_xticks(range(0, len(groups), step), [str(g) for g in groups[::step]], fontsize=7)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    for boundary in range(1, len(groups)):
        ax.axvline(boundary - 0.5, color="0.9", linewidth=0.5, zorder=0)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("||W - W_hat||² / ||W||²")
    ax.set_title(title, fontsize=9)
    if kinds:
        handles = [Line2D([], [], linestyle="none", marker="o", color=colours[k], label=k) for k in kinds]
        fig.legend(handles=handles, fontsize=7, ncols=min(len(kinds), int(width)), loc="outside lower center", frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]  # q_proj, down_proj, ...


def _group(name: str) -> int | str:
    block = layer_block(name)
    return OTHER_GROUP if block is None else block


def _plot_positions(layers: list[dict[str, Any]]) -> tuple[list[int | str], list[float]]:
    """The groups in x order (blocks ascending, then "other"), and each layer's x: its group's place,
    shifted by its kind's place among the kinds present in that group, so kinds sit side by side."""
    members: dict[int | str, list[str]] = {}
    for layer in layers:
        members.setdefault(_group(layer["name"]), []).append(_kind(layer["name"]))
    groups = sorted(g for g in members if g != OTHER_GROUP) + ([OTHER_GROUP] if OTHER_GROUP in members else [])
    present = {g: list(dict.fromkeys(members[g])) for g in groups}
    width = 0.8 / max((len(kinds) for kinds in present.values()), default=1)
    place = {g: x for x, g in enumerate(groups)}
    xs = []
    for layer in layers:
        kinds = present[_group(layer["name"])]
        xs.append(place[_group(layer["name"])] + (kinds.index(_kind(layer["name"])) - (len(kinds) - 1) / 2) * width)
    return groups, xs


def read_report(job_dir: str | Path) -> dict[str, Any] | None:
    path = Path(job_dir) / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
