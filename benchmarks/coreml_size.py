"""Core ML package size of the default model at float16 and at 8, 6, 4, 3 and 2 bits, and the ratio to float16.

For each bit width the script runs (or resumes) a data-free k-means job, per_grouped_channel with
group_size 16 and float16 LUTs, in two variants: `linear` leaves the tied embedding / lm_head in
float16 (as the repository's recipes do), `all` palettizes it too (once: it is one tensor). Each job is
exported with `llmpalette.export.coreml` (context 512, prefill 64: the two functions share every
weight), and every compressed weight in the package is checked bit for bit against the job's
`decode()`. The float16 package is the same program with no compressed weight. Sizes are of the whole
`.mlpackage` folder; the ratios in Apple's palettization performance page (whole models, float16 = 1)
are printed beside ours.

From the repository root:

    python -m benchmarks.coreml_size [--bits 8 6 4 3 2] [--variants linear all] [--work DIR] [--evaluate 4]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from llmpalette.export.coreml import ProgramShape, build_package, verify_package
from llmpalette.jobs import run_job
from llmpalette.jobs.compressed import apply_weights, compressed_weights
from llmpalette.jobs.manifest import Manifest
from llmpalette.recipe import Recipe
from llmpalette.sources.models import load_model

GROUP_SIZE = 16
SKIP_HEAD = {"lm_head": None, "model.embed_tokens": None}
# seeds/palettization-performance.txt: compression ratio vs float16 (MobileNetv2, MobileNetv3-small, ResNet50, ...)
APPLE_RATIOS = {8: "1.93-1.97", 6: "2.54-2.65", 4: "3.38-3.9", 2: "5.82-7.63"}


def recipe(bits: int, variant: str) -> Recipe:
    config = {"global_config": {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": GROUP_SIZE,
                                "lut_dtype": "float16"}}
    if variant == "linear":
        config["module_name_configs"] = SKIP_HEAD
    return Recipe.from_dict({"model": "default", "stages": [{"algorithm": "kmeans", "config": config}],
                             "evaluate": {"windows": 0}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4, 3, 2])
    parser.add_argument("--variants", nargs="+", default=["linear", "all"], choices=["linear", "all"])
    parser.add_argument("--work", type=Path, default=Path("jobs/coreml-size"), help="jobs and packages go here (jobs/ is git-ignored)")
    parser.add_argument("--evaluate", type=int, default=0, metavar="BITS",
                        help="also run the reference evaluation (prefill + decode vs torch) for this bit width")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    shape = ProgramShape(context_length=512, prefill_length=64)

    model, tokenizer = load_model("default")
    started = time.perf_counter()
    fp16 = build_package(model, {}, args.work / "float16.mlpackage", shape)
    rows = [{"variant": "float16", "bits": 16, "bytes": fp16.bytes, "ratio": 1.0, "compress_s": 0.0,
             "export_s": round(time.perf_counter() - started, 1), "exact": "-"}]
    print(f"float16: {fp16.bytes:,} B", flush=True)
    for variant in args.variants:
        for bits in args.bits:
            job = args.work / f"job-{variant}-{bits}bit"
            started = time.perf_counter()
            run_job(recipe(bits, variant), job, resume=job.exists(), progress=False, loaded=(model, tokenizer), evaluate=False)
            compress_s = time.perf_counter() - started
            units = compressed_weights(Manifest.load(job))
            weights = {name: w for _, names, w in units.values() for name in names}
            started = time.perf_counter()
            package = args.work / f"{variant}-{bits}bit.mlpackage"
            result = build_package(model, weights, package, shape)
            export_s = time.perf_counter() - started
            evaluate = bits == args.evaluate
            decoded = apply_weights(copy.deepcopy(model), units, job) if evaluate else model  # read only when evaluating
            check = verify_package(package, {n: w for n, (_, _, w) in units.items()}, decoded, sequences=2 if evaluate else 0)
            row = {"variant": variant, "bits": bits, "bytes": result.bytes, "ratio": round(fp16.bytes / result.bytes, 3),
                   "compress_s": round(compress_s, 1), "export_s": round(export_s, 1),
                   "exact": f"{check.bit_exact}/{check.weights}", "problems": check.problems}
            if check.max_abs_error is not None:
                row["logit_error"] = [check.max_abs_error, check.torch_fp16_error, check.tolerance]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| weights palettized | bits | .mlpackage bytes | × smaller than float16 | Apple's ratios | weights bit-exact |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        what = {"float16": "none (float16)", "linear": "linear layers", "all": "linear layers + tied embedding/head"}[row["variant"]]
        bits = "16" if row["variant"] == "float16" else str(row["bits"])
        apple = APPLE_RATIOS.get(row["bits"], "-") if row["variant"] != "float16" else "1.0"
        print(f"| {what} | {bits} | {row['bytes']:,} | {row['ratio']:.2f} | {apple} | {row['exact']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
