"""llmpalette: compress large language models for Apple devices.

Python API: `llmpalette.palettization.PostTrainingPalettizer` (in memory, Core ML Tools' names) and
`llmpalette.from_pretrained(JOB_DIR)` (a finished job as a transformers model).
"""
from __future__ import annotations

__version__ = "0.1.0"


def from_pretrained(job_dir, *, model: str | None = None, device="cpu"):
    """A transformers model whose palettized weights are decoded from the job's LUTs and indices.

    Args:
        job_dir: a finished job directory (`llmpalette compress ... --job-dir JOB`).
        model: overrides the job's source model (same architecture), e.g. a local copy of a hub model.
        device: where the model goes.

    Example:
        model = llmpalette.from_pretrained("jobs/default")
    """
    return load(job_dir, model=model, device=device)[0]


def load(job_dir, *, model: str | None = None, device="cpu"):
    """(model, tokenizer): `from_pretrained`'s model and the job's tokenizer (None when the model has none).

    Example:
        model, tokenizer = llmpalette.load("jobs/default")
        ids = tokenizer("def f(x):", return_tensors="pt").input_ids
        print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))
    """
    from llmpalette.jobs.compressed import load_compressed

    compressed, tokenizer, _ = load_compressed(job_dir, model=model, device=device)
    return compressed, tokenizer


__all__ = ["__version__", "from_pretrained", "load"]
