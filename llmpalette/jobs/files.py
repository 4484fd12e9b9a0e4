"""Atomic files: write to a temporary name in the same folder, fsync, then rename over the final name.

A reader (or a resumed job) therefore sees either the old complete file or the new complete file,
never a half-written one. Leftover temporaries from a killed process carry TMP_MARK in their name.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

TMP_MARK = ".tmp-"
# safetensors keeps its metadata in a hash map whose order changes from run to run, so a file with
# several metadata keys is not byte-reproducible; we store ours as one key holding sorted JSON.
METADATA_KEY = "llmpalette"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Save tensors as safetensors atomically; returns the file record {sha256, bytes} for the manifest.

    Same tensors and metadata give the same bytes, in any process.
    """
    packed = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=packed)
    atomic_write_bytes(path, data)
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by atomic_save_tensors."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        stored = f.metadata() or {}
    return tensors, json.loads(stored.get(METADATA_KEY, "{}"))


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries a killed writer left behind; returns what was removed."""
    removed = []
    if Path(folder).exists():
        for p in Path(folder).rglob(f"*{TMP_MARK}*"):
            if p.is_file():
                p.unlink()
                removed.append(p)
    return removed
