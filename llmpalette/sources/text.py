"""Text for calibration and evaluation: documents from a source, packed into fixed-length token windows.

A text spec is `default` (the pydoc topics that ship with Python), a local file (.txt, .jsonl, .json,
.parquet, .csv), a local folder of such files, or a hub dataset `name` / `name:config`. Plain text
(the pydoc topics, .txt files) is read as paragraphs: a document is a block between blank lines, so
even one file or a few long topics give both parts text (by whole topics, pydoc's held-out fifth
would be only 14 windows of 512 tokens, because its five largest topics all fall in calibration).
Documents are numbered in the order the source yields them; document i is held out for evaluation iff
i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1, so calibration and evaluation never share a document.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from llmpalette.errors import ConfigError, SourceError
from llmpalette.sources.models import is_hub_id

DEFAULT_TEXT = "default"
HELD_OUT_EVERY = 5
HELD_OUT_RULE = f"document i is held out iff i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}"
TEXT_COLUMN = "text"
DATASET_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".txt", *DATASET_BUILDERS)


@dataclass(frozen=True, eq=False)
class TextWindows:
    """Token windows for calibration and for held-out evaluation, cut from disjoint documents.

    `description` is JSON-able: the source, the held-out rule, seq_len, the tokenizer's name and, per part,
    the documents and tokens read into its stream and the windows taken.
    """

    calibration: torch.Tensor  # [n_cal, seq_len] int64
    evaluation: torch.Tensor  # [n_eval, seq_len] int64
    description: dict


def is_held_out(index: int) -> bool:
    """Whether document `index` belongs to the evaluation part."""
    return index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def iter_documents(spec: str) -> Iterator[str]:
    """The documents of a text source, in a fixed order, read lazily.

    A missing local path or an unreachable hub dataset raises SourceError here, before iteration; a file
    without a `text` column raises it when its first row is read.
    """
    if spec == DEFAULT_TEXT:
        return _pydoc_topics()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_documents(spec, path)
    if path.is_file():
        return _file_documents(spec, path)
    name = spec.partition(":")[0]
    if path.suffix in TEXT_SUFFIXES or not is_hub_id(name):
        raise SourceError(f"text '{spec}': no such file or folder {path.resolve()}")
    return _hub_documents(spec)


def check_text_source(spec: str) -> None:
    """Fail now, with a SourceError naming `spec`, if the text source cannot be read or is empty.

    Reads only up to the first document, so a job can check its text before any long work.
    """
    for document in iter_documents(spec):
        if document.strip():
            return
    raise SourceError(f"text '{spec}': holds no text")


def build_windows(
    tokenizer,
    spec: str,
    *,
    seq_len: int,
    calibration_samples: int,
    evaluation_windows: int,
) -> TextWindows:
    """Cut `calibration_samples` and `evaluation_windows` windows of `seq_len` tokens from the text `spec`.

    Each part tokenizes its documents in order without special tokens, joins them with the tokenizer's eos
    token (when it has one) into one stream and cuts consecutive non-overlapping windows from its start.
    Documents are read only until both parts have enough tokens; a part that needs none tokenizes nothing.
    Too little text is a SourceError saying how many windows each short part could give.
    """
    for name, value, least in (("seq_len", seq_len, 1), ("calibration_samples", calibration_samples, 0),
                               ("evaluation_windows", evaluation_windows, 0)):
        if value < least:
            raise ConfigError(name, f"must be an integer >= {least}, got {value}")
    calibration = _PartStream(calibration_samples * seq_len)
    evaluation = _PartStream(evaluation_windows * seq_len)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for index, text in enumerate(iter_documents(spec)):
        part = evaluation if is_held_out(index) else calibration
        if not part.full:
            part.append(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], separator)
        if calibration.full and evaluation.full:
            break
    _check_enough(spec, seq_len, {"calibration": (calibration, calibration_samples),
                                  "evaluation": (evaluation, evaluation_windows)})
    description = {
        "source": spec,
        "rule": HELD_OUT_RULE,
        "seq_len": seq_len,
        "tokenizer": tokenizer.name_or_path or type(tokenizer).__name__,
        "calibration": calibration.describe(calibration_samples),
        "evaluation": evaluation.describe(evaluation_windows),
    }
    return TextWindows(calibration.windows(calibration_samples, seq_len),
                       evaluation.windows(evaluation_windows, seq_len), description)


def calibration_windows(
    tokenizer,
    spec: str,
    *,
    seq_len: int,
    count: int,
    wanted=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Calibration windows 0..count-1 of `spec`, lazily: yields (index, window [seq_len] int64).

    The same windows as `build_windows(...).calibration`, cut from the calibration documents only
    (never a held-out one), tokenized one document at a time; at most one window plus one document's
    tokens are held. `wanted(index)` picks the windows to yield (a rank's own samples); the others
    are cut and dropped. Too little text is a SourceError once the text runs out.
    """
    if count < 0 or seq_len < 1:
        raise ConfigError("count" if count < 0 else "seq_len", "must be >= 0" if count < 0 else "must be >= 1")
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    buffer: list[int] = []
    index = documents = 0
    if count == 0:
        return
    for position, text in enumerate(iter_documents(spec)):
        if is_held_out(position):
            continue
        if documents:
            buffer.extend(separator)
        buffer.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        documents += 1
        start = 0
        while len(buffer) - start >= seq_len:
            if wanted is None or wanted(index):
                yield index, torch.tensor(buffer[start : start + seq_len], dtype=torch.int64)
            start += seq_len
            index += 1
            if index == count:
                return
        del buffer[:start]
    raise SourceError(f"text '{spec}' is too short for {count} calibration windows of {seq_len} tokens "
                      f"({HELD_OUT_RULE}): {index} available; use more text, fewer samples or a shorter seq_len")


def check_calibration_text(tokenizer, spec: str, *, seq_len: int, count: int) -> None:
    """Fail now, with a SourceError, if `spec` cannot give `count` calibration windows (tokenizes, holds none)."""
    for _ in calibration_windows(tokenizer, spec, seq_len=seq_len, count=count, wanted=lambda index: False):
        pass


@dataclass
class _PartStream:
    """One part's token stream, filled document by document until it holds `wanted` tokens."""

    wanted: int
    tokens: list[int] = field(default_factory=list)
    documents: int = 0

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.wanted

    def append(self, ids: list[int], separator: list[int]) -> None:
        if self.documents:
            self.tokens.extend(separator)
        self.tokens.extend(ids)
        self.documents += 1

    def available(self, seq_len: int) -> int:
        return len(self.tokens) // seq_len

    def windows(self, count: int, seq_len: int) -> torch.Tensor:
        return torch.tensor(self.tokens[: count * seq_len], dtype=torch.int64).view(count, seq_len)

    def describe(self, count: int) -> dict:
        return {"documents": self.documents, "tokens": len(self.tokens), "windows": count}


def _check_enough(spec: str, seq_len: int, parts: dict[str, tuple[_PartStream, int]]) -> None:
    short = [f"{stream.available(seq_len)} {name} windows available, {asked} asked"
             for name, (stream, asked) in parts.items() if not stream.full]
    if short:
        raise SourceError(f"text '{spec}' is too short for windows of {seq_len} tokens ({HELD_OUT_RULE}): "
                          f"{'; '.join(short)}; use more text, fewer windows or a shorter seq_len")


def _pydoc_topics() -> Iterator[str]:
    """The paragraphs of every pydoc topic, topics in sorted key order."""
    from pydoc_data.topics import topics

    return (paragraph for key in sorted(topics) for paragraph in _paragraphs(topics[key].splitlines(keepends=True)))


def _folder_documents(spec: str, folder: Path) -> Iterator[str]:
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in TEXT_SUFFIXES)
    if not files:
        raise SourceError(f"text '{spec}': folder {folder.resolve()} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return (document for path in files for document in _file_documents(spec, path))


def _file_documents(spec: str, path: Path) -> Iterator[str]:
    if path.suffix == ".txt":
        return _txt_documents(path)
    if path.suffix not in DATASET_BUILDERS:
        raise SourceError(f"text '{spec}': cannot read {path.resolve()}; use one of {', '.join(TEXT_SUFFIXES)}")
    try:
        rows = datasets.load_dataset(DATASET_BUILDERS[path.suffix], data_files=str(path), split="train",
                                     streaming=True)
    except (OSError, ValueError) as error:
        raise SourceError(f"text '{spec}': could not read {path.resolve()}: {error}") from error
    return _text_column(f"text '{spec}' ({path.name})", rows)


def _txt_documents(path: Path) -> Iterator[str]:
    """The paragraphs of a text file, read line by line."""
    with path.open(encoding="utf-8") as file:
        yield from _paragraphs(file)


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blocks of non-blank lines (a line of only whitespace is blank), each with its line endings."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block = []
    if block:
        yield "".join(block)


def _hub_documents(spec: str) -> Iterator[str]:
    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except (OSError, ValueError) as error:
        raise SourceError(f"could not load text '{spec}' from the Hugging Face hub (offline or not found): "
                          f"{error}; pass a local file or folder") from error
    return _text_column(f"text '{spec}'", rows)


def _text_column(what: str, rows: Iterable[dict]) -> Iterator[str]:
    """The `text` value of each row; None counts as an empty document so row i stays document i."""
    try:
        for row in rows:
            if TEXT_COLUMN not in row:
                raise SourceError(f"{what} has no '{TEXT_COLUMN}' column; its columns are: {', '.join(row)}")
            yield row[TEXT_COLUMN] or ""
    except (OSError, ValueError) as error:
        raise SourceError(f"{what}: could not read its rows: {error}") from error
