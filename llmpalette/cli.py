"""`llmpalette compress | report | export | verify`: the commands. Expected errors become one line and exit code 2."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from llmpalette import __version__
from llmpalette.errors import LlmpaletteError

log = logging.getLogger("llmpalette")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpalette", description="Compress LLMs for Apple devices.")
    parser.add_argument("--version", action="version", version=f"llmpalette {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    compress = sub.add_parser("compress", help="run (or resume) a compression job, then evaluate it and write its report")
    compress.add_argument("recipe", help="recipe YAML file (see recipes/)")
    compress.add_argument("--job-dir", required=True, help="job directory: manifest, layer files, report")
    compress.add_argument("--resume", action="store_true", help="continue a killed job: keep intact layers, redo missing or corrupt ones")
    compress.add_argument("--model", help="override the recipe's model: a hub id, a transformers folder or a .gguf file")
    compress.add_argument("--tokenizer", help="where the tokenizer is, when the model has none (hub id, folder or .gguf)")
    compress.add_argument("--data", help="override the recipe's text: 'default', a local .txt/.jsonl/.parquet file or folder, or a hub dataset")
    compress.add_argument("--no-eval", action="store_true",
                          help="skip the perplexity evaluation and write no report (report.json/.md/.png); "
                               "`llmpalette report JOB` writes it later (with --no-eval there: without perplexity)")
    compress.add_argument("--quiet", action="store_true", help="no progress bars, no information lines (warnings and errors only)")

    report = sub.add_parser("report", help="print a job's report (writing it first, with the perplexity evaluation, "
                                           "if it has none or has none measured)")
    report.add_argument("job_dir")
    report.add_argument("--json", action="store_true", help="print report.json instead of the markdown")
    report.add_argument("--no-eval", action="store_true",
                        help="skip the perplexity evaluation: a job without a report gets one from the compression "
                             "figures only (sizes, per-layer errors, compression time)")
    report.add_argument("--quiet", action="store_true", help="no progress bars, no information lines")

    export = sub.add_parser("export", help="turn a finished job into a Core ML model (iOS18 .mlpackage) and check it")
    export.add_argument("job_dir")
    export.add_argument("--coreml", required=True, metavar="OUT.mlpackage", help="the Core ML package to write")
    export.add_argument("--context-length", type=int, default=512, help="KV-cache length in tokens (default 512)")
    export.add_argument("--prefill-length", type=int, default=64, help="tokens per prefill call (default 64)")
    export.add_argument("--model", help="override the job's source model (same architecture)")
    export.add_argument("--no-verify", action="store_true", help="skip the checks after writing (weights, reference evaluation)")
    export.add_argument("--quiet", action="store_true", help="warnings and errors only")

    verify = sub.add_parser("verify", help="check a Core ML package against its job (on Linux: no Core ML runtime needed)")
    verify.add_argument("package", metavar="OUT.mlpackage")
    verify.add_argument("--against", required=True, metavar="JOB", help="the job the package was exported from")
    verify.add_argument("--model", help="override the job's source model (same architecture)")
    verify.add_argument("--sequences", type=int, default=2, help="token sequences for the reference evaluation (0: weights only)")
    verify.add_argument("--decode-steps", type=int, default=4, help="decode steps after each prefill (default 4)")
    verify.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return parser


def _setup_output(quiet: bool, main_rank: bool = True) -> None:
    """Our information lines on stderr (warnings only when quiet or not rank 0); libraries kept quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("llmpalette: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if quiet or not main_rank else logging.INFO)
    if quiet:
        from llmpalette.sources.models import quiet_libraries

        quiet_libraries()


def _compress(args) -> int:
    from llmpalette import distributed
    from llmpalette.jobs.runner import run_job
    from llmpalette.recipe import Recipe

    recipe = Recipe.from_yaml(args.recipe).with_overrides(model=args.model, text=args.data, tokenizer=args.tokenizer)
    with distributed.world() as world:
        _setup_output(args.quiet, world.is_main)
        summary = run_job(recipe, args.job_dir, resume=args.resume, world=world, progress=not args.quiet,
                          evaluate=not args.no_eval)
        if world.is_main:
            _after_stages(args, recipe, summary, world.world_size)
    return 0


def _after_stages(args, recipe, summary, world_size: int) -> None:
    """Rank 0, once the stages are done: the summary, then (holding the job's lock) the report and the export."""
    from llmpalette.evaluate.report import build_report, compression_time, compression_time_line, quality_verdict
    from llmpalette.jobs.lock import JobLock
    from llmpalette.jobs.manifest import Manifest

    redone = f" ({len(summary.redone)} of them redone because a file was missing or corrupt)" if summary.redone else ""
    print(f"compressed {summary.units} layers ({summary.computed} computed{redone}, {summary.kept} kept from an earlier run) "
          f"on {world_size} rank(s) in {summary.seconds:.1f} s (this run's wall time, model loading included) "
          f"-> {summary.job_dir}")
    print(f"{compression_time_line(compression_time(Manifest.load(summary.job_dir)))}, as the job records it "
          "(passes summed over its runs, each layer's latest computation)")
    export = recipe.export.coreml if recipe.export is not None else None
    if args.no_eval and export is None:
        return
    with JobLock(summary.job_dir):  # the report and the export write into the job too
        if not args.no_eval:
            report = build_report(summary.job_dir, progress=not args.quiet, loaded=summary.loaded)
            _print_summary(report, quality_verdict(report["evaluation"]))
        if export is not None:
            _export_recipe(export, summary.job_dir)


def _export_recipe(spec, job_dir: Path) -> None:
    """The recipe's `export: {coreml: ...}` section, run after the stages; a relative path is inside the job."""
    from llmpalette.export.coreml import export_coreml

    out = Path(spec.path) if Path(spec.path).is_absolute() else job_dir / spec.path
    result = export_coreml(job_dir, out, context_length=spec.context_length, prefill_length=spec.prefill_length)
    print("\n".join(result.lines()))


def _export(args) -> int:
    from llmpalette.export.coreml import export_coreml

    _setup_output(args.quiet)
    result = export_coreml(args.job_dir, args.coreml, context_length=args.context_length,
                           prefill_length=args.prefill_length, model=args.model, verify=not args.no_verify)
    print("\n".join(result.lines()))
    return 0


def _verify(args) -> int:
    from llmpalette.export.coreml import verify_coreml

    _setup_output(args.quiet)
    result = verify_coreml(args.package, args.against, model=args.model, sequences=args.sequences,
                           decode_steps=args.decode_steps)
    print("\n".join(result.lines()))
    if not result.passed:
        print(f"llmpalette: error: {args.package} fails {len(result.problems)} check(s) against {args.against}", file=sys.stderr)
        return 1
    return 0


def _print_summary(report: dict, verdict: str | None) -> None:
    ev, size = report["evaluation"], report["size"]
    if "perplexity_after" in ev:
        print(f"perplexity {ev['perplexity_before']:.3f} -> {ev['perplexity_after']:.3f} "
              f"({ev['windows']} held-out windows of {ev['seq_len']} tokens)")
    elif ev.get("reason"):
        log.warning("perplexity not measured: %s", ev["reason"])
    print(f"size {size['float16_bytes']:,} B (float16) -> {size['compressed_bytes']:,} B, "
          f"ratio {size['compression_ratio_vs_float16']:.2f}x; report: {Path(report['job_dir']) / 'report.md'}")
    if verdict:
        print(verdict)


def _report(args) -> int:
    from llmpalette.evaluate.report import REPORT_MD, build_report, needs_evaluation, read_report
    from llmpalette.jobs.compressed import compressed_weights
    from llmpalette.jobs.lock import JobLock
    from llmpalette.jobs.manifest import Manifest

    _setup_output(args.quiet)
    manifest = Manifest.load(Path(args.job_dir))
    report = read_report(args.job_dir)
    if report is None or (needs_evaluation(report) and not args.no_eval):
        spec = manifest.data["recipe"]["evaluate"]
        if not args.no_eval and spec["windows"]:
            log.info("%s has no perplexity yet: evaluating the float and compressed models on %d held-out windows of "
                     "%d tokens first (`llmpalette report %s --no-eval` skips it)",
                     args.job_dir, spec["windows"], spec["seq_len"], args.job_dir)
        with JobLock(args.job_dir):  # refuses while a compress or another report writes the job
            report = build_report(args.job_dir, progress=not args.quiet, evaluate=not args.no_eval)  # checks the job first
    else:
        compressed_weights(manifest)  # the job may have been damaged since its report
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print((Path(args.job_dir) / REPORT_MD).read_text(encoding="utf-8"), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    saved = (log.handlers[:], log.propagate, log.level)
    try:
        code = {"compress": _compress, "report": _report, "export": _export, "verify": _verify}[args.command](args)
        sys.stdout.flush()
        return code
    except LlmpaletteError as e:
        print("llmpalette: error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmpalette: interrupted; resume with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`llmpalette report --json | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        log.handlers[:], log.propagate, log.level = saved


if __name__ == "__main__":
    sys.exit(main())
