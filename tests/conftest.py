"""Shared fixtures: tiny tokenizers and tiny random models built from configs in code, never downloaded."""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
FAMILIES = ("llama", "gpt2", "opt", "bert")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: a worker's tiny models gain nothing from intra-op threads, and
    # two threads per worker would oversubscribe the cores.
    torch.set_num_threads(1)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a chat template: real tokenization, no download."""
    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(family: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast):
    """A two-layer config of the family, hidden size 32."""
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **ids,
        )
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, **ids)
    if family == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            **ids,
        )
    if family == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
        )
    raise ValueError(family)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def save_tiny_model(
    folder: Path, family: str = "llama", task: str = "causal_lm", num_labels: int = 2, **sizes: int
) -> Path:
    """Saves a seeded tiny model of the family (plus tokenizer) into `folder` and returns it; `sizes` override config
    fields such as hidden_size."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    config = build_config(family, len(tokenizer), tokenizer)
    for name, value in sizes.items():
        setattr(config, name, value)
    if task == "classification":
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Returns a factory: `make_model_dir(family, task)` saves a tiny model + tokenizer and returns the folder."""

    def make(family: str = "llama", task: str = "causal_lm", num_labels: int = 2) -> Path:
        return save_tiny_model(tmp_path / f"tiny-{family}-{task}", family, task, num_labels)

    return make
