"""Data-free k-means palettization: llmpalette against Core ML Tools, same model, text and settings, one run.

Both tools get the same config dictionary (per_grouped_channel, group_size 16, lm_head and the tied
model.embed_tokens skipped) on deep copies of the same float model. For each bit width the script times
`compress` alone, then measures held-out perplexity and the relative squared error of the compressed
linear weights. Core ML Tools runs with its own defaults otherwise (enable_fast_kmeans_mode on, so it
rounds weights to 4 decimals before clustering; one k-means worker): what a user gets out of the box.

From the repository root (or anywhere, with llmpalette installed):

    python -m benchmarks.kmeans_vs_coremltools [--bits 4 3 2] [--windows 16] [--seq-len 512]
                                               [--skip-coremltools] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import torch
from torch import nn

from llmpalette.evaluate.perplexity import perplexity
from llmpalette.palettization import (
    ModulePostTrainingPalettizerConfig,
    PostTrainingPalettizer,
    PostTrainingPalettizerConfig,
    palettize_weight,
)
from llmpalette.sources.models import load_model
from llmpalette.sources.text import build_windows

GROUP_SIZE = 16
# SmolLM2 ties lm_head to model.embed_tokens; skipping only one name still compresses the tensor in Core ML Tools.
SKIPPED = ("lm_head", "model.embed_tokens")
OURS = "llmpalette"
THEIRS = "coremltools"
PERPLEXITY_TARGET = 1.01  # ours at most 1% above theirs
SPEEDUP_TARGET = 5.0  # ours at least 5x faster
THREADING_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


@dataclass(frozen=True)
class Result:
    bits: int
    tool: str
    seconds: float
    perplexity: float
    relative_error: float
    load_average: float  # 1-minute load average just before compress


def palettizer_config(n_bits: int) -> dict:
    """The one config dictionary both tools' `PostTrainingPalettizerConfig.from_dict` take."""
    return {
        "global_config": {"n_bits": n_bits, "granularity": "per_grouped_channel", "group_size": GROUP_SIZE},
        "module_name_configs": {name: None for name in SKIPPED},
    }


def compress_ours(model: nn.Module, n_bits: int) -> nn.Module:
    config = PostTrainingPalettizerConfig.from_dict(palettizer_config(n_bits))
    return PostTrainingPalettizer(model, config).compress(inplace=True)


def compress_coremltools(model: nn.Module, n_bits: int) -> nn.Module:
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer as CoremlPalettizer
    from coremltools.optimize.torch.palettization import PostTrainingPalettizerConfig as CoremlConfig

    return CoremlPalettizer(model, CoremlConfig.from_dict(palettizer_config(n_bits))).compress(inplace=True)


COMPRESSORS = {OURS: compress_ours, THEIRS: compress_coremltools}


def compressed_linear_names(model: nn.Module) -> list[str]:
    """The linear layers both tools compress under `palettizer_config`: every nn.Linear but the skipped ones."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in SKIPPED]


def relative_squared_error(reference: nn.Module, compressed: nn.Module, names: list[str]) -> float:
    """sum ||W - W_hat||^2 / sum ||W||^2 over the named layers, in float64."""
    error = 0.0
    norm = 0.0
    for name in names:
        w = reference.get_submodule(name).weight.detach().double()
        w_hat = compressed.get_submodule(name).weight.detach().double()
        error += float((w - w_hat).square().sum())
        norm += float(w.square().sum())
    return error / norm


def changed_layers(reference: nn.Module, compressed: nn.Module, names: list[str]) -> int:
    return sum(not torch.equal(reference.get_submodule(n).weight, compressed.get_submodule(n).weight) for n in names)


def warm_up(model: nn.Module, n_bits: int) -> float:
    """Palettize a slice of one layer, so numba's compile or cache load is not charged to the first timed run."""
    weight = model.get_submodule(compressed_linear_names(model)[0]).weight.detach()[: 4 * GROUP_SIZE].clone()
    config = ModulePostTrainingPalettizerConfig.from_dict(palettizer_config(n_bits)["global_config"])
    start = time.perf_counter()
    palettize_weight(weight, config)
    return time.perf_counter() - start


def run_tool(tool: str, float_model: nn.Module, n_bits: int, windows: torch.Tensor, names: list[str]) -> Result:
    model = copy.deepcopy(float_model)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    model = COMPRESSORS[tool](model, n_bits)
    seconds = time.perf_counter() - start
    changed = changed_layers(float_model, model, names)
    error = relative_squared_error(float_model, model, names)
    ppl = perplexity(model, windows, batch_size=4)
    print(f"  {n_bits}-bit {tool}: compress {seconds:.1f} s (1-min load average before: {load:.2f}), "
          f"{changed}/{len(names)} linear layers changed, rel. sq. error {error:.6e}, perplexity {ppl:.3f}", flush=True)
    del model
    gc.collect()
    return Result(n_bits, tool, seconds, ppl, error, load)


def numba_threading_layer() -> str:
    """The layer numba's parallel kernels run on (omp, tbb, workqueue); known once one has run."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "none started"


def machine_facts(tools: list[str]) -> dict:
    """Cores, threads, the threading environment and versions; call after numba has run a parallel kernel."""
    facts = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": numba_threading_layer(),
        "environment": {name: os.environ.get(name) for name in THREADING_ENVIRONMENT},
        "versions": {"torch": torch.__version__, "numba": numba.__version__},
    }
    if THEIRS in tools:
        import coremltools

        facts["versions"]["coremltools"] = coremltools.__version__
    return facts


def print_setup(machine: dict, windows_description: dict, tools: list[str], bits: list[int]) -> None:
    print("## Machine")
    for key, value in machine.items():
        print(f"- {key}: {json.dumps(value)}")
    print("## Text")
    print(f"- {json.dumps(windows_description)}")
    print("## Settings")
    for b in bits:
        print(f"- config for both tools: {json.dumps(palettizer_config(b))}")
    if THEIRS in tools:
        print("- Core ML Tools runs with its defaults otherwise: enable_fast_kmeans_mode=True (weights rounded to "
              "4 decimals before k-means), rounding_precision=4, compress(num_kmeans_workers=1)")
    print("- compress seconds: wall time of compress alone; the machine may be shared, see the load averages")
    print(flush=True)


def print_table(float_ppl: float, results: list[Result]) -> None:
    print(f"\n## Results (float perplexity {float_ppl:.3f})\n")
    print("| bits | tool | compress seconds | load avg before | perplexity | ppl / float | rel. sq. error |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.bits} | {r.tool} | {r.seconds:.1f} | {r.load_average:.2f} | {r.perplexity:.3f} | "
              f"{r.perplexity / float_ppl:.3f} | {r.relative_error:.6e} |")
    by_key = {(r.bits, r.tool): r for r in results}
    bits = sorted({r.bits for r in results}, reverse=True)
    if not all((b, THEIRS) in by_key for b in bits):
        return
    print("\n## llmpalette against Core ML Tools\n")
    print("| bits | our ppl vs theirs | our rel. sq. error vs theirs | speedup (their s / our s) "
          "| ppl target (<= +1%) | speed target (>= 5x) |")
    print("|---:|---:|---:|---:|---|---|")
    for b in bits:
        ours, theirs = by_key[(b, OURS)], by_key[(b, THEIRS)]
        ratio = ours.perplexity / theirs.perplexity
        speedup = theirs.seconds / ours.seconds
        print(f"| {b} | {ratio - 1:+.2%} | {ours.relative_error / theirs.relative_error - 1:+.2e} | {speedup:.1f}x | "
              f"{'met' if ratio <= PERPLEXITY_TARGET else 'MISSED'} | {'met' if speedup >= SPEEDUP_TARGET else 'MISSED'} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="bit widths to compare")
    parser.add_argument("--windows", type=int, default=16, help="held-out evaluation windows")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--skip-coremltools", action="store_true", help="run llmpalette only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Core ML Tools reads this when it is imported; its per-layer INFO lines would drown the figures.
    os.environ.setdefault("COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL", "warning")
    tools = [OURS] if args.skip_coremltools else [OURS, THEIRS]
    start = time.perf_counter()
    float_model, tokenizer = load_model("default", dtype=torch.float32)
    text = build_windows(tokenizer, "default", seq_len=args.seq_len, calibration_samples=0,
                         evaluation_windows=args.windows)
    print(f"model loaded and text tokenized in {time.perf_counter() - start:.1f} s\n")
    names = compressed_linear_names(float_model)
    warm_up_seconds = warm_up(float_model, args.bits[0])
    machine = machine_facts(tools)
    print_setup(machine, text.description, tools, args.bits)
    print(f"llmpalette warm-up (numba compile or cache load, untimed below): {warm_up_seconds:.1f} s", flush=True)
    float_ppl = perplexity(float_model, text.evaluation, batch_size=4)
    print(f"float perplexity {float_ppl:.3f}", flush=True)
    results = [run_tool(tool, float_model, b, text.evaluation, names) for b in args.bits for tool in tools]
    print_table(float_ppl, results)
    if args.json:
        args.json.write_text(json.dumps({
            "float_perplexity": float_ppl,
            "warm_up_seconds": warm_up_seconds,
            "text": text.description,
            "machine": machine,
            "configs": [palettizer_config(b) for b in args.bits],
            "results": [asdict(r) for r in results],
        }, indent=2))


if __name__ == "__main__":
    main()
