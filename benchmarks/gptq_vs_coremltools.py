"""GPTQ: llmpalette against Core ML Tools 9.0 (and RTN, k-means, SKM, LUT-GPTQ), same model, text and settings.

What it measures. The default model (SmolLM2-135M-Instruct, float32, `load_model("default")`), lm_head and
the tied model.embed_tokens left alone by every method, compressed at each setting:

Linear quantization:
- `int4-pc`: 4 bits, per_channel, symmetric;
- `int4-pc-affine`: 4 bits, per_channel, affine (a zero point per channel: 16 levels from min to max);
- `int3-b32`: 3 bits, per_block, block_size 32 (along the input axis), symmetric;
by
- `rtn`: llmpalette's data-free round to nearest (`PostTrainingQuantizer`, int4 / int3: RTN's signed grid);
- `gptq`: llmpalette's `LayerwiseCompressor` with `algorithm: gptq` (RTN's grid conventions, each range from
  its clipping search, the default), use_activation_order_heuristic true (`--no-act-order`: false), blocks =
  the decoder layers (its default);
- `coremltools`: Core ML Tools' `coremltools.optimize.torch.layerwise_compression.LayerwiseCompressor`
  with `algorithm: gptq`, weight_dtype uint4 / uint3, the same granularity, block size, scheme, dampening
  (0.01), processing_group_size (128) and activation order, layers `model.layers.\\d+`.

Palettization, per_grouped_channel with group_size 16:
- `lut4-g16`, `lut3-g16`: 4 and 3 bits, by
- `kmeans`: llmpalette's data-free exact k-means (`PostTrainingPalettizer`);
- `skm`: llmpalette's `SKMPalettizer` (Fisher-weighted k-means), no outliers, gradient checkpointing on,
  run as benchmarks/skm_vs_coremltools.py runs it (a sensitivity pass per N, then the clustering);
- `lut-gptq`: llmpalette's `LayerwiseCompressor` with `algorithm: lut_gptq`, lut_iterations 2 (GPTQ's error
  feedback onto the k-means LUTs), use_activation_order_heuristic true (its default; `--no-act-order`: false).

Plus `float`, the model as loaded. The calibration methods get the same N windows of seq_len tokens
(`calibration_windows(tokenizer, "default", seq_len=..., count=N)`, default N = 16 and 128, seq_len 512);
the data-free ones run once. For each (method, setting, N): held-out perplexity on 16 evaluation windows of
512 tokens (`build_windows(...).evaluation`, disjoint from the calibration text, `evaluate.perplexity`, as in
skm_vs_coremltools.py), its ratio to the float perplexity, the wall time of the compression call alone and
the peak RSS over that call.

How. Every step runs in its own child process (this script with `--child`), so each peak RSS is that step's
alone. A child loads the model, cuts the calibration windows, builds the compressor (constructors are not
timed), then times the one call: `compress(...)` (for `skm`, `compute_sensitivity` in one child and
`compress(sensitivity_path=...)` in another: its wall time is the sum, its peak the larger of the two), then
evaluates. Model loading, tokenizing and the evaluation are not counted, and are the same for every method.
Peak RSS: after loading, the child frees what it can (gc, malloc_trim), resets the kernel's high-water mark
(/proc/self/clear_refs) and reads VmHWM after the call; the parent also samples the child's process tree every
50 ms during the call (no method here starts processes, so the two agree up to sampling). The peak includes
the float model (about 0.54 GB) and whatever the tool holds beside it. llmpalette's numba k-means kernels
(used by kmeans, skm and lut-gptq's k-means start) are warmed up before the timed call (compiled or loaded
from numba's cache), and the warm-up seconds are reported.

Run from the repository root (llmpalette and coremltools 9.0 installed):

    python3 benchmarks/gptq_vs_coremltools.py [--samples 16 128]
        [--methods rtn gptq coremltools kmeans skm lut-gptq] [--settings int4-pc int3-b32 lut4-g16 lut3-g16]
        [--seq-len 512] [--eval-windows 16] [--no-act-order] [--workers N]
        [--out results.json] [--work-dir DIR [--reuse]] [--quick]

`--quick` (seq_len 128, 2 samples, 2 evaluation windows, settings int4-pc and lut4-g16; explicit flags still
win) is a smoke run: its figures mean nothing (it took about 30 minutes on 2 cores, most of it lut-gptq,
before lut-gptq's compiled kernels; not timed since). The full run at 16 samples (every method and setting) took 28 minutes on this 2-core machine
(2026-11-24: 16 evaluations of about 20 s, model loads of about 17 s, the SKM sensitivity pass 111 s, each
calibrated GPTQ call 64-80 s, lut-gptq's 131-140 s); at 128 samples gptq, lut-gptq and coremltools at four
settings took 43 minutes (each call 339-410 s). `--work-dir` keeps each child's log, spec and JSON result,
the result as the parent completed it (`<label>.result.json`: the sampled tree peak, wall time and load averages
added) and the SKM sensitivity files; by default they go to a temporary directory that is removed.

`--reuse` (needs `--work-dir`) resumes an interrupted run: a step (float, a compression, a sensitivity pass)
whose `<label>.result.json` from an earlier run in that directory holds no error, and whose spec was the same
(`<label>.spec.json` but its "result" and "marker" paths), is not run again: its stored result is used, its
progress line says "reused (measured earlier)" and its result in `--out` gets `"reused": true` (its figures,
wall time and load averages included, are the earlier run's). Every spec records the code under "code": the
git commit of this repository and whether `git status --porcelain -- llmpalette benchmarks` shows changes
(null without git), so a new commit runs every step again; nothing is reused while that status shows changes
or without git (the code could differ unseen), nor a sensitivity pass whose safetensors file is gone.

Caveats.
- Never use affine int4 per_block 32 as evidence (the script does not offer it): the default model's
  weights were stored as GGUF Q4_1, affine 4-bit in blocks of 32 along the input axis, so affine int4
  block-32 RTN reproduces them exactly (its error is zero) and any method on that grid looks perfect.
  The settings here (per channel, or symmetric 3-bit blocks) do not line up with that grid.
- The grids differ (the main difference between the tools; Core ML Tools' API has no way to ask for ours).
  llmpalette's GPTQ uses RTN's grid conventions (Core ML Tools' PostTrainingQuantizer maths): symmetric signed
  int4 is the 15 levels [-7, 7] * s with s = m / 7 (int3: [-3, 3] * m / 3, 7 levels), so `rtn` and `gptq`
  are the same format; RTN takes m = max|w|, our GPTQ the m = p max|w| (p from 1 down to 0.81) that
  minimises the row's (block's) rounding error weighted by the Hessian's diagonal (`clipping_search`). Core ML Tools' GPTQ (`layerwise_compression/_quant.py`) uses its own grid, which
  differs from its RTN's: unsigned [0, 2^n - 1] with the zero point fixed mid-range at 2^(n-1) and
  s = 2 max|w| / (2^n - 1), i.e. the 2^n levels [-8, 7] * s (int3: [-4, 3] * s): one level more than ours
  (16 vs 15, 8 vs 7; this matters most at 3 bits), a finer step (max/7.5 vs max/7; max/3.5 vs max/3), but the
  largest positive weight of each row / block is clipped to 7/7.5 (3/3.5) of its value. Its 4- and 3-bit
  weight_dtype must be "uint4" / "uint3" ("int4" / "int3" map to torch.int8, which its ModuleGPTQConfig
  refuses). Its symmetric scheme is the same zero-point-in-the-middle grid for both.
- Input cacher: Core ML Tools' "default" input cacher feeds each dataloader item unchanged to the first
  listed layer (model.layers.0 would get token ids and fails: "The size of tensor a (576) must match the size
  of tensor b ..."); for a transformers decoder its GPT cacher ("gpt") is the one to use: it runs the whole
  model on each item (a [1, seq_len] int64 tensor of input_ids, called positionally) until a forward
  pre-hook on the first decoder layer catches the hidden states and keyword arguments (position embeddings,
  mask, position ids) and stops it. The keyword arguments of the last sample are reused for every sample
  (fine here: all windows have the same length, no padding). `model.config.use_cache` is set False before
  its compress (otherwise a KV cache caught in the keyword arguments would grow across layers and samples);
  llmpalette passes use_cache=False itself.
- Order of measurement: llmpalette measures each group of layers reading the same input (q/k/v, o_proj,
  gate/up, down_proj) after the groups before it in the block are compressed (true_sequential, its default,
  the GPTQ paper's order); Core ML Tools measures every layer of a block on the block's inputs under the
  original weights of that block, then compresses them all. Both feed each block the outputs of the
  compressed blocks before it.
- Hessian scale: Core ML Tools accumulates 2/n sum x x^T over samples, llmpalette sum x x^T / tokens; the
  dampening is relative to the mean diagonal, so the same GPTQ up to float rounding. If H stays singular,
  llmpalette raises the dampening 10x at a time; Core ML Tools' Cholesky would fail instead.
- Per-block with activation order: both fix each block's scale from the original weight beforehand (static
  groups); without it, both set a block's scale from the error-corrected weights when its first column is
  reached. Per channel: both from the original weight.
- Core ML Tools' compress always keeps a deep copy of the uncompressed model (for its report), even with
  inplace=True (about +0.54 GB); llmpalette's compress(inplace=True) keeps none. Both hold every
  calibration sample's hidden states at the current block (N x seq_len x 576 float32, inputs and outputs).
- `--no-act-order` turns the activation order off for gptq, coremltools and lut-gptq alike. lut-gptq and skm produce float LUTs per group of 16 output channels, as kmeans does.
- skm's wall time is its sensitivity pass plus its clustering, each timed alone in its own child; its
  sensitivity pass uses gradient checkpointing (as the recipes) and glibc's mmap threshold fixed by
  llmpalette.memory.
- Threads: every child runs with torch's default threads (the cores); k-means uses `--workers` threads
  (default: the cores). Wall times are taken on whatever else the machine is doing (on a shared 2-core
  machine the same call has varied 3x between runs); the 1-minute load average before each child is printed
  and kept in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or with -m
import _measure  # noqa: E402
from _measure import GB, calibration, fmt, timed  # noqa: E402

GROUP_SIZE = 16
# SmolLM2 ties lm_head to model.embed_tokens: both are left alone (named for the data-free tools; outside the
# GPTQ blocks for the layerwise ones).
SKIPPED = ("lm_head", "model.embed_tokens")
DECODER_LAYERS = "model.layers.\\d+"
LUT_ITERATIONS = 2

QUANT_SETTINGS = {
    # ours: llmpalette's ModulePostTrainingQuantizerConfig / ModuleGPTQConfig fields;
    # theirs: Core ML Tools' ModuleGPTQConfig fields (its GPTQ takes unsigned dtypes only).
    "int4-pc": {"ours": {"weight_dtype": "int4", "granularity": "per_channel", "quantization_scheme": "symmetric"},
                "theirs": {"weight_dtype": "uint4", "granularity": "per_channel", "quantization_scheme": "symmetric"}},
    "int4-pc-affine": {"ours": {"weight_dtype": "int4", "granularity": "per_channel", "quantization_scheme": "affine"},
                       "theirs": {"weight_dtype": "uint4", "granularity": "per_channel", "quantization_scheme": "affine"}},
    "int3-b32": {"ours": {"weight_dtype": "int3", "granularity": "per_block", "block_size": 32,
                          "quantization_scheme": "symmetric"},
                 "theirs": {"weight_dtype": "uint3", "granularity": "per_block", "block_size": 32,
                            "quantization_scheme": "symmetric"}},
}
LUT_SETTINGS = {"lut4-g16": 4, "lut3-g16": 3}
SETTINGS = (*QUANT_SETTINGS, *LUT_SETTINGS)
QUANT_METHODS = ("rtn", "gptq", "coremltools")
LUT_METHODS = ("kmeans", "skm", "lut-gptq")
METHODS = (*QUANT_METHODS, *LUT_METHODS)
DATA_FREE = ("rtn", "kmeans")
THEIRS = "coremltools"
QUICK = {"seq_len": 128, "samples": [2], "eval_windows": 2, "settings": ["int4-pc", "lut4-g16"]}
FULL = {"seq_len": 512, "samples": [16, 128], "eval_windows": 16, "settings": list(SETTINGS)}
REPOSITORY = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- configs

def methods_for(setting: str) -> tuple[str, ...]:
    return QUANT_METHODS if setting in QUANT_SETTINGS else LUT_METHODS


def rtn_config(setting: str) -> dict:
    """llmpalette's `PostTrainingQuantizerConfig.from_dict` dictionary."""
    return {"global_config": dict(QUANT_SETTINGS[setting]["ours"]),
            "module_name_configs": {name: None for name in SKIPPED}}


def gptq_config(setting: str, samples: int, act_order: bool) -> dict:
    """llmpalette's `LayerwiseCompressorConfig.from_dict` dictionary (blocks: its default, the decoder layers)."""
    return {"global_config": {"algorithm": "gptq", **QUANT_SETTINGS[setting]["ours"],
                              "use_activation_order_heuristic": act_order},
            "calibration_nsamples": samples}


def coremltools_config(setting: str, samples: int, act_order: bool) -> dict:
    """Core ML Tools' `LayerwiseCompressorConfig.from_dict` dictionary; dampening and processing group size
    written out at the value both tools default to."""
    return {"global_config": {"algorithm": "gptq", **QUANT_SETTINGS[setting]["theirs"],
                              "use_activation_order_heuristic": act_order, "hessian_dampening": 0.01,
                              "processing_group_size": 128},
            "layers": [DECODER_LAYERS], "calibration_nsamples": samples, "input_cacher": "gpt"}


def palettizer_config(setting: str) -> dict:
    """llmpalette's `PostTrainingPalettizerConfig` / `SKMPalettizerConfig` dictionary (SKM adds calibration_nsamples)."""
    return {"global_config": {"n_bits": LUT_SETTINGS[setting], "granularity": "per_grouped_channel",
                              "group_size": GROUP_SIZE},
            "module_name_configs": {name: None for name in SKIPPED}}


def skm_config(setting: str, samples: int) -> dict:
    return {**palettizer_config(setting), "calibration_nsamples": samples}


def lut_gptq_config(setting: str, samples: int, act_order: bool = True) -> dict:
    return {"global_config": {"algorithm": "lut_gptq", "n_bits": LUT_SETTINGS[setting],
                              "granularity": "per_grouped_channel", "group_size": GROUP_SIZE,
                              "lut_iterations": LUT_ITERATIONS, "use_activation_order_heuristic": act_order},
            "calibration_nsamples": samples}


def config_for(method: str, setting: str, samples: int, act_order: bool) -> dict:
    """The dictionary the method's `from_dict` gets (recorded in the JSON)."""
    return {"rtn": lambda: rtn_config(setting),
            "gptq": lambda: gptq_config(setting, samples, act_order),
            THEIRS: lambda: coremltools_config(setting, samples, act_order),
            "kmeans": lambda: palettizer_config(setting),
            "skm": lambda: skm_config(setting, samples),
            "lut-gptq": lambda: lut_gptq_config(setting, samples, act_order)}[method]()


# ------------------------------------------------------------------------------------- memory measurement

def child_main(spec_path: str) -> None:
    """One step in this process; writes its result (JSON) to spec['result']."""
    _measure.child_main(spec_path, _sensitivity, _compress)


def _sensitivity(spec: dict, model, tokenizer) -> dict:
    """llmpalette's SKM sensitivity pass, as skm_vs_coremltools.py runs it (gradient checkpointing on)."""
    from llmpalette.palettization.sensitive_k_means import SKMPalettizer, SKMPalettizerConfig

    windows = calibration(tokenizer, spec)
    config = skm_config("lut4-g16", spec["samples"])  # the bits do not change which weights get one
    config["gradient_checkpointing"] = True
    palettizer = SKMPalettizer(model, SKMPalettizerConfig.from_dict(config))
    _, seconds, memory = timed(lambda: palettizer.compute_sensitivity(windows, sensitivity_path=spec["path"]))
    return {"seconds": seconds, "file_bytes": os.path.getsize(spec["path"]), "config": config, **memory}


def _warm_up(model, method: str, setting: str) -> float:
    """Run the method's numba k-means kernels on a slice of one layer, so their compile or cache load is not timed."""
    import torch

    from llmpalette.palettization import ModulePostTrainingPalettizerConfig, palettize_weight

    def kernel(weight) -> None:
        if method == "kmeans":
            palettize_weight(weight, ModulePostTrainingPalettizerConfig.from_dict(palettizer_config(setting)["global_config"]))
        elif method == "skm":
            from llmpalette.palettization.sensitive_k_means import ModuleSKMPalettizerConfig, skm_palettize_weight

            sensitivity = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0))
            skm_palettize_weight(weight, ModuleSKMPalettizerConfig.from_dict(palettizer_config(setting)["global_config"]),
                                 sensitivity=sensitivity)
        elif method == "lut-gptq":
            from llmpalette.quantization import LayerwiseCompressorConfig
            from llmpalette.quantization.layerwise_compressor import compress_linear

            x = torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(0))
            config = LayerwiseCompressorConfig.from_dict(lut_gptq_config(setting, 1)).global_config
            compress_linear(weight, x.T @ x / x.shape[0], config)

    return _measure.warm_up(model, SKIPPED, 4 * GROUP_SIZE, kernel)


def _compress(spec: dict, model, tokenizer) -> dict:
    """Build the method's compressor (untimed), then time its one call."""
    method, setting, samples, act_order = spec["method"], spec["setting"], spec["samples"], spec["act_order"]
    config = config_for(method, setting, samples, act_order)
    warm_up = 0.0
    extra: dict = {}
    if method == "rtn":
        from llmpalette.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

        quantizer = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(config))
        run = lambda: quantizer.compress(inplace=True)  # noqa: E731
    elif method == "kmeans":
        from llmpalette.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

        warm_up = _warm_up(model, method, setting)
        palettizer = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict(config))
        run = lambda: palettizer.compress(num_kmeans_workers=spec["workers"], inplace=True)  # noqa: E731
    elif method == "skm":
        from llmpalette.palettization.sensitive_k_means import SKMPalettizer, SKMPalettizerConfig

        warm_up = _warm_up(model, method, setting)
        palettizer = SKMPalettizer(model, SKMPalettizerConfig.from_dict(config))
        run = lambda: palettizer.compress(sensitivity_path=spec["path"], num_kmeans_workers=spec["workers"],  # noqa: E731
                                          inplace=True)
    elif method in ("gptq", "lut-gptq"):
        from llmpalette.quantization import LayerwiseCompressor, LayerwiseCompressorConfig

        if method == "lut-gptq":
            warm_up = _warm_up(model, method, setting)
        windows = calibration(tokenizer, spec)
        compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict(config))
        run = lambda: compressor.compress(windows, device="cpu", inplace=True)  # noqa: E731
    elif method == THEIRS:
        from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

        # Its GPT input cacher calls model(input_ids) with the model's own use_cache: keep no KV cache.
        model.config.use_cache = False
        windows = [w.view(1, -1) for w in calibration(tokenizer, spec)]
        compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict(config))
        run = lambda: compressor.compress(windows, device="cpu", inplace=True)  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    before = _measure.fingerprints(model, embeddings=True)
    compressed, seconds, memory = timed(run)
    after = _measure.fingerprints(compressed, embeddings=True)
    if method in ("gptq", "lut-gptq"):
        extra["layer_metrics"] = _summarise(compressor.metrics)
    if method == THEIRS:
        compressed.config.use_cache = True
    linear = [n for n in before if n not in SKIPPED]
    return {"seconds": seconds, "warm_up_seconds": warm_up, "model": compressed, "config": config, **memory,
            "linear_layers": len(linear), "linear_layers_changed": sum(after[n] != before[n] for n in linear),
            "skipped_unchanged": all(after[n] == before[n] for n in SKIPPED if n in before), **extra}


def _summarise(metrics: dict[str, dict[str, float]]) -> dict:
    """Means of llmpalette's per-layer metrics (output_rel_error is the error GPTQ minimises)."""
    if not metrics:
        return {}
    keys = sorted({k for m in metrics.values() for k in m})
    return {"layers": len(metrics),
            **{f"mean_{k}": sum(m.get(k, 0.0) for m in metrics.values()) / len(metrics) for k in keys}}


# ----------------------------------------------------------------------------------------------- parent

def code_version(root: Path = REPOSITORY) -> dict | None:
    """The spec's "code": the git commit of the repository at `root` and whether
    `git status --porcelain -- llmpalette benchmarks` shows changes there; None without git (or a checkout)."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", "-C", str(root), *arguments], capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(),
                "changed": bool(git("status", "--porcelain", "--", "llmpalette", "benchmarks").strip())}
    except (OSError, subprocess.CalledProcessError):
        return None


def _without_paths(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("result", "marker")}


def stored_result(spec: dict, work: Path, label: str) -> dict | None:
    """An earlier run's result of this step in WORK (WORK/<label>.result.json, as `run_child` saved it), or None:
    only if it holds no error, its spec (WORK/<label>.spec.json, and the one the child recorded in its result)
    is `spec` but for the result and marker paths, the code is known and unchanged (a commit, no uncommitted
    changes), and a sensitivity pass's file is still there."""
    code = spec.get("code")
    if code is None or code.get("changed"):
        return None
    try:
        result = json.loads((work / f"{label}.result.json").read_text())
        written = json.loads((work / f"{label}.spec.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = json.loads(json.dumps(spec))  # as it would read back (tuples as lists)
    if (not isinstance(result, dict) or "error" in result or _without_paths(written) != wanted
            or _without_paths(result.get("spec") or {}) != wanted):
        return None
    if spec["step"] == "sensitivity" and not os.path.exists(spec["path"]):
        return None
    return result


def run_child(spec: dict, work: Path, label: str, reuse: bool = False) -> dict:
    """Run one step in a fresh process; its output goes to WORK/<label>.log. Returns its result or an error,
    also saved, as completed here, to WORK/<label>.result.json. With `reuse`, an earlier run's result of the
    same step (`stored_result`) is returned instead, marked "reused": true."""
    if reuse:
        stored = stored_result(spec, work, label)
        if stored is not None:
            return {**stored, "reused": True}
    saved = work / f"{label}.result.json"
    saved.unlink(missing_ok=True)  # never left beside a newer spec
    result = _measure.run_child(spec, work, label, Path(__file__).resolve())
    if "error" not in result:
        result["load_average_after"] = os.getloadavg()[0]
    saved.write_text(json.dumps(result, indent=2))
    return result


def describe(label: str, r: dict) -> str:
    return _measure.describe(label, r, eval_seconds=True)


def build_rows(float_result: dict, steps: dict) -> list[dict]:
    """One row per (method, setting, samples), after float in the order of SETTINGS, samples and METHODS;
    skm: wall = sensitivity + clustering, peak = max of the two."""
    rows = []
    float_ppl = float_result.get("perplexity")
    rows.append({"method": "float", "setting": "float32", "samples": 0, "perplexity": float_ppl,
                 "ratio": 1.0 if float_ppl else None, "wall_s": None, "peak_rss_bytes": float_result.get("peak_rss_bytes"),
                 "error": float_result.get("error")})
    def order(item) -> tuple:  # the rows' order: not the order the steps ran in (or the flags' order)
        (method, setting, samples), _ = item
        return SETTINGS.index(setting), samples, METHODS.index(method)

    for (method, setting, samples), r in sorted(steps["compress"].items(), key=order):
        sens = steps["sensitivity"].get(samples) if method == "skm" else None
        error = r.get("error") or (sens or {}).get("error")
        row = {"method": method, "setting": setting, "samples": samples, "error": error, "perplexity": None,
               "ratio": None, "wall_s": None, "peak_rss_bytes": None}
        if not error:
            row.update(perplexity=r["perplexity"], ratio=r["perplexity"] / float_ppl if float_ppl else None,
                       wall_s=r["seconds"] + (sens["seconds"] if sens else 0.0),
                       peak_rss_bytes=max(r["peak_rss_bytes"], sens["peak_rss_bytes"] if sens else 0),
                       load_average_before=r["load_average_before"], load_average_after=r["load_average_after"])
            if sens:
                row.update(sensitivity_s=sens["seconds"], clustering_s=r["seconds"],
                           sensitivity_peak_rss_bytes=sens["peak_rss_bytes"], clustering_peak_rss_bytes=r["peak_rss_bytes"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    _measure.table_head("## Results", ["method", "setting", "samples", "perplexity", "ratio to float", "wall s",
                                       "peak RSS GB", "load avg before/after"], "llrrrrrr")
    for r in rows:
        if r["error"]:
            print(_measure.failed_row([r["method"], r["setting"], r["samples"] or "-"], r["error"], 8))
            continue
        load = (f"{r['load_average_before']:.2f}/{r['load_average_after']:.2f}" if "load_average_before" in r else "-")
        print(f"| {r['method']} | {r['setting']} | {r['samples'] or '-'} | {fmt(r['perplexity'], '.3f')} | "
              f"{fmt(r['ratio'], '.4f')} | {fmt(r['wall_s'], '.1f')} | "
              f"{fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / GB, '.2f')} | {load} |")
    skm = [r for r in rows if r["method"] == "skm" and not r["error"]]
    if skm:
        print("\nskm: wall = sensitivity s + clustering s; peak = max(sensitivity peak, clustering peak)")
        for r in skm:
            print(f"- {r['setting']} n{r['samples']}: {r['sensitivity_s']:.1f} + {r['clustering_s']:.1f} s; "
                  f"{r['sensitivity_peak_rss_bytes'] / GB:.2f} / {r['clustering_peak_rss_bytes'] / GB:.2f} GB")


def comparisons(rows: list[dict]) -> list[dict]:
    """Ours (gptq) against Core ML Tools' GPTQ at the same setting and samples."""
    found = []
    for ours, theirs in _measure.against(rows, "setting", ("gptq",), THEIRS):
        found.append({"setting": ours["setting"], "samples": ours["samples"],
                      "perplexity_ours": ours["perplexity"], "perplexity_theirs": theirs["perplexity"],
                      "perplexity_ratio": ours["perplexity"] / theirs["perplexity"],
                      "wall_ratio": ours["wall_s"] / theirs["wall_s"],
                      "rss_ratio": ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]})
    return found


def print_comparisons(found: list[dict]) -> None:
    if not found:
        return
    _measure.table_head("## llmpalette GPTQ against Core ML Tools' GPTQ (same setting and samples; < 1: ours lower)",
                        ["setting", "samples", "ppl ours", "ppl theirs", "ppl ours/theirs", "wall ours/theirs",
                         "peak RSS ours/theirs"], "lrrrrrr")
    for c in found:
        print(f"| {c['setting']} | {c['samples']} | {c['perplexity_ours']:.3f} | {c['perplexity_theirs']:.3f} | "
              f"{c['perplexity_ratio']:.3f} | {c['wall_ratio']:.3f} | {c['rss_ratio']:.3f} |")


def print_notes(args) -> None:
    print("\n## Notes\n")
    n = args.samples[0]
    for setting in args.settings:
        for method in methods_for(setting):
            if method in args.methods:
                print(f"- {method} {setting}: {json.dumps(config_for(method, setting, n, not args.no_act_order))}")
    print(f"- text: {args.seq_len}-token windows; calibration = the first N `calibration_windows` of the default text; "
          f"perplexity on {args.eval_windows} held-out windows")
    print("- wall s = the compression call alone (loading, tokenizing, constructors and evaluation not counted; "
          "numba warm-up untimed); skm: sensitivity + clustering")
    print("- peak RSS over the timed call (high-water mark reset after loading; the parent also samples the process "
          "tree every 50 ms); it includes the float32 model; float's row is the RSS with the model loaded")
    print("- grids: llmpalette's gptq = its rtn grid (signed symmetric, 2^n - 1 levels); Core ML Tools' GPTQ: "
          "uint with a mid zero point (2^n levels, the top one clipped); see the docstring's caveats")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", help="calibration window counts (default 16 128; quick: 2)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods besides float")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS,
                        help="settings (default all: int4-pc int4-pc-affine int3-b32 lut4-g16 lut3-g16; quick: int4-pc lut4-g16)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default 512; quick: 128)")
    parser.add_argument("--eval-windows", type=int, help="held-out evaluation windows (default 16; quick: 2)")
    parser.add_argument("--no-act-order", action="store_true",
                        help="gptq, coremltools and lut-gptq with use_activation_order_heuristic false (default: true for all three)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="num_kmeans_workers (default: cores)")
    parser.add_argument("--out", type=Path, help="also write the raw results here (JSON)")
    parser.add_argument("--work-dir", type=Path, help="keep sensitivities, child logs and results here (default: a temp dir, removed)")
    parser.add_argument("--reuse", action="store_true",
                        help="resume an earlier run in --work-dir (required): a step whose result there has no error "
                             "and whose spec (code commit included) is the same is not run again, its result is used; "
                             "nothing is reused while llmpalette/ or benchmarks/ have uncommitted changes")
    parser.add_argument("--quick", action="store_true", help="smoke run: seq_len 128, 2 samples, 2 eval windows, int4-pc and lut4-g16")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reuse and args.work_dir is None:
        parser.error("--reuse needs --work-dir (the directory of the run to resume)")
    return _measure.fill_defaults(args, QUICK, FULL)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    started, work, temp, machine = _measure.start_run(args.work_dir, "gptq_vs_coremltools_",
                                                      ("torch", "numba", "transformers", "coremltools"))
    act_order = not args.no_act_order
    print(f"## Plan: settings {args.settings}, samples {args.samples}, methods {args.methods}, seq_len {args.seq_len}, "
          f"eval windows {args.eval_windows}, activation order (gptq, coremltools, lut-gptq) {act_order}; "
          f"children log to {work}\n", flush=True)
    code = code_version()
    if args.reuse and (code is None or code["changed"]):
        print(f"--reuse: nothing will be reused ({'no git' if code is None else 'uncommitted changes in llmpalette/ or benchmarks/'})\n",
              flush=True)
    common = {"seq_len": args.seq_len, "eval_windows": args.eval_windows, "workers": args.workers, "act_order": act_order,
              "code": code}

    float_result = run_child({**common, "step": "float"}, work, "float", args.reuse)
    if "error" not in float_result:
        print(describe("float", float_result), flush=True)
    steps: dict = {"sensitivity": {}, "compress": {}}

    def compress(method: str, setting: str, samples: int, path: str | None = None) -> None:
        label = f"{method}-{setting}" + (f"-n{samples}" if samples else "")
        r = steps["compress"][(method, setting, samples)] = run_child(
            {**common, "step": "compress", "method": method, "setting": setting, "samples": samples, "path": path},
            work, label, args.reuse)
        if "error" not in r:
            print(describe(label, r), flush=True)

    for setting in args.settings:
        for method in (m for m in DATA_FREE if m in methods_for(setting) and m in args.methods):
            compress(method, setting, 0)
    for samples in args.samples:
        path = None
        if "skm" in args.methods and any(s in LUT_SETTINGS for s in args.settings):
            path = str(work / f"skm-sensitivity-n{samples}.safetensors")
            label = f"skm-sensitivity-n{samples}"
            r = steps["sensitivity"][samples] = run_child({**common, "step": "sensitivity", "samples": samples,
                                                           "path": path}, work, label, args.reuse)
            if "error" not in r:
                print(describe(label, r) + f", file {r['file_bytes'] / GB:.2f} GB", flush=True)
        for setting in args.settings:
            for method in (m for m in methods_for(setting) if m in args.methods and m not in DATA_FREE):
                if method == "skm" and "error" in steps["sensitivity"][samples]:
                    steps["compress"][(method, setting, samples)] = {"error": "no sensitivities"}
                    continue
                compress(method, setting, samples, path if method == "skm" else None)
        if temp is not None and path and os.path.exists(path):
            os.remove(path)

    rows = build_rows(float_result, steps)
    print_table(rows)
    found = comparisons(rows)
    print_comparisons(found)
    print_notes(args)
    raw = {"|".join(str(p) for p in k): v for k, v in steps["compress"].items()}
    raw.update({f"skm-sensitivity|{k}": v for k, v in steps["sensitivity"].items()})
    settings = {"settings": args.settings, "samples": args.samples, "methods": args.methods, "seq_len": args.seq_len,
                "eval_windows": args.eval_windows, "act_order": act_order, "num_kmeans_workers": args.workers,
                "quick": args.quick, "group_size": GROUP_SIZE, "skipped": list(SKIPPED), "lut_iterations": LUT_ITERATIONS}
    _measure.finish(started, args.out, temp, settings=settings, machine=machine, float=float_result, steps=raw, rows=rows,
                    gptq_vs_coremltools=found)


if __name__ == "__main__":
    main()
