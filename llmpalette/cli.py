"""`llmpalette compress | report`: the commands. Expected errors become one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmpalette.errors import LlmpaletteError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpalette", description="Compress LLMs for Apple devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    compress = sub.add_parser("compress", help="run (or resume) a compression job, then evaluate it and write its report")
    compress.add_argument("recipe", help="recipe YAML file (see recipes/)")
    compress.add_argument("--job-dir", required=True, help="job directory: manifest, layer files, report")
    compress.add_argument("--resume", action="store_true", help="continue a killed job: keep intact layers, redo missing or corrupt ones")
    compress.add_argument("--model", help="override the recipe's model: a hub id, a transformers folder or a .gguf file")
    compress.add_argument("--data", help="override the recipe's text: 'default', a local .txt/.jsonl/.parquet file or folder, or a hub dataset")
    compress.add_argument("--no-eval", action="store_true", help="skip the evaluation and report")
    compress.add_argument("--quiet", action="store_true", help="no progress bars")

    report = sub.add_parser("report", help="print a job's report (evaluating it first if it has none)")
    report.add_argument("job_dir")
    report.add_argument("--json", action="store_true", help="print report.json instead of the markdown")
    return parser


def _compress(args) -> int:
    from llmpalette import distributed
    from llmpalette.evaluate.report import build_report
    from llmpalette.jobs.runner import run_job
    from llmpalette.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe).with_overrides(model=args.model, text=args.data)
    with distributed.world() as world:
        summary = run_job(recipe, args.job_dir, resume=args.resume, world=world, progress=not args.quiet)
        if world.is_main:
            print(f"compressed {summary.units} layers ({summary.computed} computed, {summary.kept} kept from an earlier run) "
                  f"on {world.world_size} rank(s) in {summary.seconds:.1f} s -> {summary.job_dir}")
            if not args.no_eval:
                report = build_report(args.job_dir, progress=not args.quiet, loaded=summary.loaded)
                _print_summary(report)
    return 0


def _print_summary(report: dict) -> None:
    ev, size = report["evaluation"], report["size"]
    if "perplexity_after" in ev:
        print(f"perplexity {ev['perplexity_before']:.3f} -> {ev['perplexity_after']:.3f} "
              f"({ev['windows']} held-out windows of {ev['seq_len']} tokens)")
    print(f"size {size['float16_bytes']:,} B (float16) -> {size['compressed_bytes']:,} B, "
          f"ratio {size['compression_ratio_vs_float16']:.2f}x; report: {Path(report['job_dir']) / 'report.md'}")


def _report(args) -> int:
    from llmpalette.evaluate.report import REPORT_MD, build_report, read_report

    report = read_report(args.job_dir) or build_report(args.job_dir)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print((Path(args.job_dir) / REPORT_MD).read_text(encoding="utf-8"), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"compress": _compress, "report": _report}[args.command](args)
    except LlmpaletteError as e:
        print("llmpalette: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmpalette: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
