"""Atomic files: write to a temporary name in the same folder, fsync, then rename over the final name.

A reader (or a resumed job) therefore sees either the old complete file or the new complete file,
never a half-written one. Leftover temporaries from a killed process carry TMP_MARK in their name.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

TMP_MARK = ".tmp-"


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


def atomic_write_file(path: Path, data: bytes) -> dict:
    """Write `data` atomically; returns the file record {sha256, bytes} for the manifest."""
    atomic_write_bytes(path, data)
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def atomic_replace_dir(path: Path, fill) -> None:
    """Build a folder under a temporary name with `fill(tmp_path)`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete temporaries a killed writer left behind; returns what was removed."""
    removed = []
    if Path(folder).exists():
        for p in sorted(Path(folder).rglob(f"*{TMP_MARK}*")):
            if p.is_file():
                p.unlink()
                removed.append(p)
            elif p.is_dir():
                shutil.rmtree(p)
                removed.append(p)
    return removed
