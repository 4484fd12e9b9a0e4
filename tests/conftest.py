"""Shared fixtures: tiny random Llama models built from a config, with a byte-level tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <eos>): covers any text, built without the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(seed: int = 0, *, tie: bool = True, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=256,
        bos_token_id=256,
        pad_token_id=256,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine spinning threads slow them many-fold.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (tied embeddings) saved as a local transformers folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


TINY_RECIPE = """
model: {model}
data: {{text: default, samples: 0, seq_len: 64}}
stages:
  - algorithm: kmeans
    config:
      global_config: {{n_bits: {bits}, granularity: per_grouped_channel, group_size: 8, weight_threshold: 0}}
      module_name_configs: {{lm_head: null, model.embed_tokens: null}}
evaluate: {{windows: 4, seq_len: 64, batch_size: 2}}
"""


@pytest.fixture
def tiny_recipe(tmp_path, tiny_llama_dir) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(model=tiny_llama_dir, bits=3))
    return path
