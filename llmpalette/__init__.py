"""llmpalette: compress large language models for Apple devices.

Python API: `llmpalette.palettization.PostTrainingPalettizer` (in memory, Core ML Tools' names) and
`llmpalette.from_pretrained(JOB_DIR)` (a finished job as a transformers model).
"""
from __future__ import annotations

__version__ = "0.1.0"


def from_pretrained(job_dir, *, model: str | None = None, device="cpu"):
    """A transformers model whose palettized weights are decoded from the job's LUTs and indices.

    `model` overrides the job's source model (same architecture), e.g. a local copy of a hub model.
    """
    from llmpalette.jobs.compressed import load_compressed

    compressed, _, _ = load_compressed(job_dir, model=model, device=device)
    return compressed


__all__ = ["__version__", "from_pretrained"]
