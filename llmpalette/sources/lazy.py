"""A model's weights read one tensor at a time, and a skeleton model to put them in.

`load_model` holds the whole model in memory. To compress a model while holding only the tensors being
worked on, a job builds the model without weights (`empty_model`: every parameter on the meta device,
computed buffers such as rotary `inv_freq` real) and puts the weights of one block at a time in from a
`WeightReader`, which reads a single tensor from disk per call: `safe_open` for a safetensors folder (one
file or shards under `model.safetensors.index.json`), or the tensor's own bytes of a GGUF file, dequantized
and processed as transformers' GGUF loader does it. A parameter read here is the tensor `load_model` would
hold for it, bit for bit.

Tied parameters are one weight: SmolLM2's `lm_head.weight` is `model.embed_tokens.weight`. `names()` lists
the tie once, under the name transformers lists it (`named_parameters()`); `read` answers to every name of
the tie, and `materialize`/`release` keep the tie (one tensor, every owner).

Example:
    >>> reader = WeightReader("default")
    >>> model = empty_model(reader.config)
    >>> hidden = torch.randn(1, 8, model.config.hidden_size)
    >>> rotary = model.model.rotary_emb(hidden, torch.arange(8)[None])  # real buffers, no weights needed
    >>> with torch.no_grad(), loaded(model, reader, "model.layers.0") as block:
    ...     hidden = block(hidden, position_embeddings=rotary)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from llmpalette.errors import SourceError
from llmpalette.sources import models
from llmpalette.sources.models import ModelSource, resolve_model

GGUF_ARCHITECTURES = ("llama", "qwen2")  # the GGUF architectures whose transformers processing is checked here
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
FULL_LOAD_ONLY = (".bin", ".pt", ".pth")
DEQUANTIZE_ROWS = 1024  # rows of a GGUF tensor dequantized at once


class WeightReader:
    """A model source's parameters, read one at a time without loading the model.

    Opening reads the config and the tensor table (not the tensors) and checks that every parameter of
    the model has a tensor on disk; a source that cannot be read lazily (`.bin`/`.pt` weights, a GGUF
    architecture other than llama and qwen2, checkpoint names transformers would convert) is a
    SourceError, and the caller falls back to `load_model`.

    Args:
        source: a model spec (see `resolve_model`) or a resolved `ModelSource`.

    Example:
        >>> reader = WeightReader("default")
        >>> reader.read("model.layers.0.self_attn.q_proj.weight", torch.bfloat16).shape
        torch.Size([576, 576])
    """

    def __init__(self, source: ModelSource | str):
        self.source = resolve_model(source) if isinstance(source, str) else source
        if self.source.kind == "gguf":
            self._file = _GgufFile(_gguf_path(self.source))
        else:
            self._file = _SafetensorsFolder(_local_folder(self.source), self.source.spec)
        self.config = self._file.config
        skeleton = empty_model(self.config)
        self._ties = _tie_groups(skeleton)
        self._file.name_tensors(skeleton)
        self._stored = {name: self._stored_name(group) for name, group in self._ties.items()}

    def names(self) -> list[str]:
        """The model's parameter names, in `named_parameters()` order, a tie listed once."""
        return list(dict.fromkeys(group[0] for group in self._ties.values()))

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Parameter `name` (any name of a tie) as `load_model(source, dtype=dtype)` holds it, bit for bit.

        Each call reads the file again and returns a tensor of its own.
        """
        if name not in self._stored:
            raise SourceError(f"model '{self.source.spec}' has no parameter '{name}'")
        return self._file.read(self._stored[name]).to(dtype)

    def _stored_name(self, group: tuple[str, ...]) -> str:
        """The one name of a tie that the file holds a tensor under."""
        present = [name for name in group if name in self._file.names]
        if len(present) == 1:
            return present[0]
        what = "no tensor" if not present else f"a tensor for each of {', '.join(present)}"
        raise SourceError(f"model '{self.source.spec}': the file holds {what} for parameter "
                          f"{' = '.join(group)}; lazy reading cannot tell what transformers would load, "
                          f"load the whole model instead")


def model_config(source: ModelSource | str) -> PretrainedConfig:
    """The transformers config of a model source, read without its weights (a reader has it as `.config`)."""
    source = resolve_model(source) if isinstance(source, str) else source
    if source.kind == "gguf":
        return AutoConfig.for_model(**_gguf_config(_gguf_path(source)))
    return AutoConfig.from_pretrained(_local_folder(source))


def empty_model(source: ModelSource | str | PretrainedConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of `source` (or of a config) with every parameter on the meta device, in eval mode.

    Ties are applied (tied names share one meta Parameter). Non-persistent buffers, which transformers
    computes instead of loading (rotary `inv_freq`), are computed here as `from_pretrained` computes them,
    so they equal the loaded model's. A model with a buffer that its checkpoint would fill is a SourceError.
    """
    config = source if isinstance(source, PretrainedConfig) else model_config(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _compute_buffers(model)
    return model.eval()


def materialize(model: PreTrainedModel, names: Iterable[str], reader: WeightReader) -> None:
    """Put the real values of parameters `names` into `model`, each in the dtype of its meta parameter.

    A tied parameter gets one tensor for all its names. Parameters already real are left as they are.
    """
    for name in names:
        old = model.get_parameter(name)
        if old.device.type != "meta":
            continue
        new = torch.nn.Parameter(reader.read(name, old.dtype), requires_grad=old.requires_grad)
        _replace(model, old, new)


def release(model: PreTrainedModel, names: Iterable[str]) -> None:
    """Put parameters `names` back on the meta device (ties kept), so their memory can be freed."""
    for name in names:
        old = model.get_parameter(name)
        if old.device.type == "meta":
            continue
        new = torch.nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
        _replace(model, old, new)


@contextmanager
def loaded(model: PreTrainedModel, reader: WeightReader, prefix: str) -> Iterator[torch.nn.Module]:
    """The submodule `prefix` of `model` with its parameters materialized, released again on exit.

    Changes made to the weights inside the block are lost on exit: save them before leaving it.

    Example:
        >>> with loaded(model, reader, "model.layers.3") as block:
        ...     hidden = block(hidden, position_embeddings=model.model.rotary_emb(hidden, positions))
    """
    module = model.get_submodule(prefix)
    names = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters()]
    materialize(model, names, reader)
    try:
        yield module
    finally:
        release(model, names)


class _SafetensorsFolder:
    """The tensors of a transformers folder's safetensors file(s), each read through its own `safe_open`.

    A file is opened per read and closed after: nothing of a tensor stays in memory once its reader drops it.
    """

    def __init__(self, folder: Path, spec: str):
        self.config = AutoConfig.from_pretrained(folder)
        self.files = _safetensors_files(folder, spec)  # stored name -> file
        self.names = set(self.files)

    def name_tensors(self, model: PreTrainedModel) -> None:
        """Nothing to map: a safetensors checkpoint stores tensors under the model's names."""

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as file:
            return file.get_tensor(name)


class _GgufFile:
    """The tensors of a GGUF file, under the model's names, as transformers' GGUF loader produces them.

    The name map and the per-architecture processing (Llama's q/k reverse permutation) are transformers'
    own (`modeling_gguf_pytorch_utils`); a read takes that tensor's bytes from the file, dequantizes them
    with the `gguf` package and processes them, as the loader does for the whole file.
    """

    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = path
        parsed = _gguf_config(path)
        self.config = AutoConfig.for_model(**parsed)
        self.processor = TENSOR_PROCESSORS.get(parsed["model_type"], TensorProcessor)(config=parsed)
        # name -> (offset, byte count, numpy dtype, numpy shape, ggml type) of the tensor's data
        self.table = {tensor.name: (int(tensor.data_offset), int(tensor.n_bytes), tensor.data.dtype,
                                    tuple(tensor.data.shape), tensor.tensor_type) for tensor in GGUFReader(path).tensors}
        self.names: set[str] = set()
        self.gguf_names: dict[str, str] = {}

    def name_tensors(self, model: PreTrainedModel) -> None:
        """Map the file's tensors to the parameter names of `model`, with transformers' GGUF name map."""
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        to_model = get_gguf_hf_weights_map(model, self.processor)
        self.gguf_names = {to_model[name]: name for name in self.table if name in to_model}
        self.names = set(self.gguf_names)

    def read(self, name: str) -> torch.Tensor:
        gguf_name = self.gguf_names[name]
        offset, nbytes, dtype, shape, ggml_type = self.table[gguf_name]
        data = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset).view(dtype).reshape(shape)
        weights = self.processor.process(weights=_dequantize(data, ggml_type), name=gguf_name).weights
        return torch.from_numpy(np.ascontiguousarray(weights))


def _dequantize(data: np.ndarray, ggml_type) -> np.ndarray:
    """`gguf.dequantize`, a slab of rows at a time into one array: the same values without the temporaries
    of a whole-tensor dequantization (about twice the float32 tensor for Q8_0)."""
    from gguf import dequantize

    if data.ndim < 2 or len(data) <= DEQUANTIZE_ROWS:
        return dequantize(data, ggml_type)
    first = dequantize(data[:DEQUANTIZE_ROWS], ggml_type)
    out = np.empty((len(data), *first.shape[1:]), dtype=first.dtype)
    out[:DEQUANTIZE_ROWS] = first
    for start in range(DEQUANTIZE_ROWS, len(data), DEQUANTIZE_ROWS):
        out[start:start + DEQUANTIZE_ROWS] = dequantize(data[start:start + DEQUANTIZE_ROWS], ggml_type)
    return out


def _gguf_path(source: ModelSource) -> Path:
    return Path(source.location) / source.gguf_file


def _gguf_config(path: Path) -> dict:
    """The config transformers' GGUF loader reads from the file's metadata (its processors take it too)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as error:
        raise SourceError(f"reading {path} needs the GGUF reader; install it with `pip install gguf`") from error
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    if parsed.get("model_type") not in GGUF_ARCHITECTURES:
        raise SourceError(f"{path}: lazy reading of GGUF architecture '{parsed.get('model_type')}' is not "
                          f"supported (only {', '.join(GGUF_ARCHITECTURES)}); load the whole model instead")
    return parsed


def _local_folder(source: ModelSource) -> Path:
    """The folder holding a folder or hub model's files; a hub model must be in the local cache."""
    if source.kind == "folder":
        return Path(source.location)
    snapshot = models._cached_snapshot(source.location)
    if snapshot is None or not models._weights_cached(snapshot):
        raise SourceError(f"model '{source.spec}' is not in the local Hugging Face cache; lazy reading needs "
                          f"its files on disk (load it once to download it)")
    return snapshot


def _safetensors_files(folder: Path, spec: str) -> dict[str, Path]:
    """Stored tensor name -> the safetensors file holding it, for a single file or an index of shards."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        with safe_open(single, framework="pt") as file:
            return {name: single for name in file.keys()}
    if any(path.suffix in FULL_LOAD_ONLY for path in folder.iterdir()):
        raise SourceError(f"model '{spec}' in {folder} holds .bin/.pt weights; lazy reading needs safetensors "
                          f"or GGUF, so load the whole model instead")
    raise SourceError(f"model '{spec}': {folder} holds no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def _tie_groups(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """Every parameter name -> all names of its Parameter, the `named_parameters()` one first."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return {name: tuple(group) for group in names.values() for name in group}


def _replace(model: torch.nn.Module, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
    """Put `new` wherever `model` holds `old`, which keeps a tie a tie."""
    for module in model.modules():
        for key, parameter in module._parameters.items():
            if parameter is old:
                module._parameters[key] = new


def _compute_buffers(model: PreTrainedModel) -> None:
    """Give the model's non-persistent buffers real values, computed as `from_pretrained` computes them.

    `from_pretrained` builds the model on meta too, then moves these buffers to the CPU and runs the
    model's `_init_weights` on their modules (which recomputes rotary frequencies from the config).
    """
    computed = dict(model.named_non_persistent_buffers())
    owners = {}
    for name, buffer in model.named_buffers():
        if name not in computed or not buffer.is_floating_point():
            raise SourceError(f"{type(model).__name__}: buffer {name} is loaded from the checkpoint, not computed; "
                              f"load the whole model instead")
        owner_name, _, key = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._buffers[key] = torch.full_like(buffer, torch.nan, device="cpu")  # NaN: not computed yet
        owners[id(owner)] = owner
    for owner in owners.values():
        model._init_weights(owner)
    for name, buffer in model.named_buffers():
        if torch.isnan(buffer).any():
            raise SourceError(f"{type(model).__name__}: buffer {name} is not computed from the config; "
                              f"load the whole model instead")
