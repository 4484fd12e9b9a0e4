"""Jobs: a recipe run into a job directory (manifest, layer files), resumable; and a finished job read back."""
from llmpalette.jobs.compressed import apply_job, compressed_weights, load_compressed
from llmpalette.jobs.manifest import Manifest
from llmpalette.jobs.runner import RunSummary, run_job

__all__ = ["Manifest", "RunSummary", "apply_job", "compressed_weights", "load_compressed", "run_job"]
