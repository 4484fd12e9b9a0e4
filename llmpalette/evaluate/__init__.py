"""Evaluation of a finished job: perplexity, sizes, per-layer error, as report.json / .md / .png."""
from llmpalette.evaluate.perplexity import perplexity
from llmpalette.evaluate.report import build_report, format_report, model_name, quality_verdict, read_report

__all__ = ["build_report", "format_report", "model_name", "perplexity", "quality_verdict", "read_report"]
