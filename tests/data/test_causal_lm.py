"""Causal LM examples: format detection, loss masks, text blocks, and packing that keeps examples apart."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from ranktune.config import DataConfig
from ranktune.data import build_collator, detect_format, prepare_causal_lm
from ranktune.data.causal_lm import IGNORE_INDEX, PACKING_ISOLATED_MODEL_TYPES
from ranktune.errors import UserInputError

END = "<|end|>"  # the test chat template's end-of-turn marker, trained together with each assistant turn
PAIRS = [
    ("Q: 2+2?\nA:", " 4"),
    ("Translate 'chat' to English:", " cat"),
    ("Say hi.", " hi there!"),
    ("Name a colour:", " blue"),
    ("The capital of France is", " Paris."),
    ("Count to three:", " 1 2 3"),
]


def config(**overrides) -> DataConfig:
    return DataConfig(train="unused", **overrides)


def train_split(**columns: list) -> DatasetDict:
    return DatasetDict({"train": Dataset.from_dict(columns)})


def char_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The tiny tokenizer is character-level: one id per character, straight from the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[char] for char in text]


def trained_runs(tokenizer: PreTrainedTokenizerFast, row: dict) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100 (labels must equal input_ids there)."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- format detection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages", "prompt", "completion", "text"], "chat"),
        (["prompt", "completion", "text"], "prompt_completion"),
        (["prompt", "text"], "text"),
    ],
)
def test_auto_format_prefers_messages_then_prompt_completion_then_text(columns: list[str], expected: str) -> None:
    dataset = Dataset.from_dict({column: ["x"] for column in columns})
    assert detect_format(dataset, config()) == expected


def test_auto_format_follows_renamed_columns() -> None:
    dataset = Dataset.from_dict({"question": ["q"], "answer": ["a"]})
    assert detect_format(dataset, config(prompt_column="question", completion_column="answer")) == "prompt_completion"


def test_explicit_format_with_missing_column_lists_columns() -> None:
    dataset = Dataset.from_dict({"prompt": ["p"], "answer": ["a"]})
    with pytest.raises(UserInputError, match=r"no column 'completion'.*its columns are: prompt, answer"):
        detect_format(dataset, config(format="prompt_completion"))


def test_no_known_column_is_an_error_listing_columns() -> None:
    with pytest.raises(UserInputError, match="cannot tell the data format: the train split has columns body, title"):
        detect_format(Dataset.from_dict({"body": ["b"], "title": ["t"]}), config())


# --- text -------------------------------------------------------------------------------------------------------


def test_text_is_concatenated_with_eos_and_cut_into_full_blocks(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = ["hello world", "", "abc", "the quick brown fox jumps"]
    stream = [t for doc in docs if doc for t in [*char_ids(tokenizer, doc), tokenizer.eos_token_id]]

    blocks = prepare_causal_lm(train_split(text=docs), tokenizer, config(max_length=8))["train"]

    assert len(stream) // 8 == len(blocks) == 5
    assert all(len(block) == 8 for block in blocks["input_ids"])
    assert [t for block in blocks["input_ids"] for t in block] == stream[: 8 * len(blocks)]
    assert blocks["labels"] == blocks["input_ids"]
    assert blocks.column_names == ["input_ids", "labels"]


def test_text_shorter_than_one_block_is_kept_whole(tokenizer: PreTrainedTokenizerFast) -> None:
    blocks = prepare_causal_lm(train_split(text=["ab", "c"]), tokenizer, config(max_length=64))["train"]
    eos = tokenizer.eos_token_id
    assert blocks["input_ids"] == [[*char_ids(tokenizer, "ab"), eos, *char_ids(tokenizer, "c"), eos]]


def test_text_without_any_content_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(UserInputError, match="the train split has no text"):
        prepare_causal_lm(train_split(text=["", "  "]), tokenizer, config())


# --- prompt / completion ----------------------------------------------------------------------------------------


def test_prompt_tokens_are_masked_and_completion_plus_eos_trained(tokenizer: PreTrainedTokenizerFast) -> None:
    prompts, completions = zip(*PAIRS, strict=True)

    rows = prepare_causal_lm(train_split(prompt=prompts, completion=completions), tokenizer, config())["train"]

    for row, (prompt, completion) in zip(rows, PAIRS, strict=True):
        assert row["input_ids"] == [*char_ids(tokenizer, prompt + completion), tokenizer.eos_token_id]
        assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert row["labels"][len(prompt) :] == row["input_ids"][len(prompt) :]
        assert trained_runs(tokenizer, row) == [completion + tokenizer.eos_token]


def test_long_examples_are_truncated_and_prompts_filling_max_length_dropped(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    splits = train_split(prompt=["abcdefgh", "ab"], completion=["xyz", "cdefghij"])

    with caplog.at_level(logging.WARNING):
        rows = prepare_causal_lm(splits, tokenizer, config(max_length=6))["train"]

    assert rows["input_ids"] == [char_ids(tokenizer, "abcdef")]
    assert rows["labels"] == [[IGNORE_INDEX] * 2 + char_ids(tokenizer, "cdef")]
    assert "dropped 1 of 2 examples because the prompt fills max_length" in caplog.text


def test_every_prompt_filling_max_length_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = train_split(prompt=["abcdefgh"], completion=["xyz"])
    with pytest.raises(UserInputError, match=r"no example left to train on.*the prompt fills max_length"):
        prepare_causal_lm(splits, tokenizer, config(max_length=4))


def test_non_string_completion_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = train_split(prompt=["a", "b"], completion=["c", None])
    with pytest.raises(UserInputError, match="example 1: column 'completion' must hold text"):
        prepare_causal_lm(splits, tokenizer, config())


# --- chat -------------------------------------------------------------------------------------------------------

TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]
MULTI_TURN = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6, of course"},
    {"role": "user", "content": "thanks"},
    {"role": "assistant", "content": "any time"},
]


def assistant_contents(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("messages", [TWO_TURNS, MULTI_TURN], ids=["two-turns", "multi-turn"])
def test_chat_trains_on_assistant_turns_only(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> None:
    row = prepare_causal_lm(train_split(messages=[messages]), tokenizer, config())["train"][0]

    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_runs(tokenizer, row) == [content + END for content in assistant_contents(messages)]


def test_chat_works_with_another_template(tokenizer: PreTrainedTokenizerFast) -> None:
    """A template with a default system prompt, role headers and newlines: no generation markers needed."""
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '[SYS]default[/SYS]\n' }}{% endif %}"
        "{% for m in messages %}{{ '### ' + m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\n' }}{% endif %}"
    )
    row = prepare_causal_lm(train_split(messages=[MULTI_TURN[1:]]), tokenizer, config())["train"][0]

    assert trained_runs(tokenizer, row) == [content + "\n\n" for content in assistant_contents(MULTI_TURN)]


def test_chat_truncation_keeps_the_assistant_tokens_that_fit(tokenizer: PreTrainedTokenizerFast) -> None:
    text = tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    cut = text.index("hello!") + 3  # the characters are tokens, except the special markers
    max_length = len(tokenizer(text[:cut], add_special_tokens=False)["input_ids"])

    row = prepare_causal_lm(train_split(messages=[TWO_TURNS]), tokenizer, config(max_length=max_length))["train"][0]

    assert trained_runs(tokenizer, row) == ["hel"]


def test_chat_without_assistant_turn_in_max_length_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = train_split(messages=[[{"role": "user", "content": "a long question"}, *TWO_TURNS[1:]]])
    with pytest.raises(UserInputError, match="no assistant turn within max_length"):
        prepare_causal_lm(splits, tokenizer, config(max_length=5))


def test_chat_needs_a_chat_template(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = None
    with pytest.raises(UserInputError, match="needs a tokenizer with a chat template"):
        prepare_causal_lm(train_split(messages=[TWO_TURNS]), tokenizer, config())


def test_malformed_conversation_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = train_split(messages=[[{"content": "no role"}]])
    with pytest.raises(UserInputError, match="example 0: column 'messages' must hold a list of messages"):
        prepare_causal_lm(splits, tokenizer, config())


def test_template_rejecting_a_conversation_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserInputError, match="chat template rejected the conversation: roles must alternate"):
        prepare_causal_lm(train_split(messages=[TWO_TURNS]), tokenizer, config())


# --- packing ----------------------------------------------------------------------------------------------------


def segments(row: dict) -> list[tuple[int, int]]:
    """[start, end) of each packed example in a row: where position_ids restart at 0."""
    starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
    return list(zip(starts, [*starts[1:], len(row["position_ids"])], strict=True))


def test_packing_fills_rows_with_whole_examples(tokenizer: PreTrainedTokenizerFast) -> None:
    prompts, completions = zip(*PAIRS, strict=True)
    splits = train_split(prompt=prompts, completion=completions)
    alone = prepare_causal_lm(splits, tokenizer, config(max_length=40))["train"]

    packed = prepare_causal_lm(splits, tokenizer, config(max_length=40, packing=True), model_type="llama")["train"]

    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert len(packed) < len(alone)
    assert all(len(row) <= 40 for row in packed["input_ids"])
    pieces = [(row["input_ids"][a:b], row["labels"][a:b]) for row in packed for a, b in segments(row)]
    expected = [(row["input_ids"], [IGNORE_INDEX, *row["labels"][1:]]) for row in alone]
    assert sorted(pieces) == sorted(expected)


def test_packed_text_keeps_documents_apart(tokenizer: PreTrainedTokenizerFast) -> None:
    docs = ["first document", "second", "a third, longer document that gets split"]
    rows = prepare_causal_lm(train_split(text=docs), tokenizer, config(max_length=16, packing=True), "llama")["train"]

    pieces = sorted((row["input_ids"][a:b] for row in rows for a, b in segments(row)), key=len, reverse=True)
    stream = [t for doc in docs for t in [*char_ids(tokenizer, doc), tokenizer.eos_token_id]]
    assert sum(len(piece) for piece in pieces) == len(stream)
    assert [*char_ids(tokenizer, "second"), tokenizer.eos_token_id] in pieces
    assert [*char_ids(tokenizer, "first document"), tokenizer.eos_token_id] in pieces


@pytest.mark.parametrize(
    ("family", "attention", "isolated"),
    [("llama", "sdpa", True), ("llama", "eager", True), ("gpt2", "sdpa", True), ("opt", "sdpa", False)],
)
def test_packed_logits_equal_each_example_alone(
    make_model_dir: Callable[..., Path],
    tokenizer: PreTrainedTokenizerFast,
    caplog: pytest.LogCaptureFixture,
    family: str,
    attention: str,
    isolated: bool,
) -> None:
    """The packed batch (collated, with padding) gives every example exactly the logits it gets alone; OPT does not
    honour the restarting position_ids, and packing for it logs one warning saying so."""
    model = AutoModelForCausalLM.from_pretrained(
        make_model_dir(family), dtype=torch.float32, attn_implementation=attention
    ).eval()
    model.config.use_cache = False  # as transformers.Trainer sets it (TrainingArguments.use_cache defaults to False)
    prompts, completions = zip(*PAIRS, strict=True)
    splits = train_split(prompt=prompts, completion=completions)
    with caplog.at_level(logging.WARNING, logger="ranktune.data.causal_lm"):
        rows = prepare_causal_lm(splits, tokenizer, config(max_length=48, packing=True), model.config.model_type)
    rows = rows["train"].to_list()
    batch = build_collator(tokenizer, "causal_lm", packing=True)(rows)
    assert "attention_mask" not in batch
    assert any(len(segments(row)) > 1 for row in rows) and len({len(row["input_ids"]) for row in rows}) > 1

    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # (B, T, V)
        differences = []
        for i, row in enumerate(rows):
            for start, end in segments(row):
                alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]  # (L, V)
                differences.append((packed_logits[i, start:end] - alone).abs().max().item())

    warnings = [record for record in caplog.records if "data.packing" in record.getMessage()]
    if isolated:
        assert max(differences) < 1e-5
        assert warnings == []
    else:
        assert max(differences) > 1e-3
        assert len(warnings) == 1
        assert f"model type '{family}'" in warnings[0].getMessage()
        assert "attention crosses example boundaries" in warnings[0].getMessage()


def test_packed_loss_equals_unpacked_loss(
    make_model_dir: Callable[..., Path], tokenizer: PreTrainedTokenizerFast
) -> None:
    """Same label tokens, same logits: the mean loss of packed and of padded one-example rows agree."""
    model = AutoModelForCausalLM.from_pretrained(make_model_dir("llama"), dtype=torch.float32).eval()
    model.config.use_cache = False
    prompts, completions = zip(*PAIRS, strict=True)
    splits = train_split(prompt=prompts, completion=completions)
    packed = prepare_causal_lm(splits, tokenizer, config(max_length=48, packing=True), "llama")["train"].to_list()
    alone = prepare_causal_lm(splits, tokenizer, config(max_length=48))["train"].to_list()

    with torch.no_grad():
        packed_loss = model(**build_collator(tokenizer, "causal_lm", packing=True)(packed)).loss
        alone_loss = model(**build_collator(tokenizer, "causal_lm")(alone)).loss

    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-5, rtol=0)


def tiny_config(model_type: str):
    """A two-layer random config of any causal LM type, through the generic key names the configs map."""
    extra = {
        "gptj": {"rotary_dim": 4},
        "codegen": {"rotary_dim": 4},
        "gpt_neo": {"attention_types": [[["global"], 2]]},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
        "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2},
        "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2},
    }
    return AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        use_cache=False, **extra.get(model_type, {}),
    )  # fmt: skip


@pytest.mark.parametrize("model_type", [*sorted(PACKING_ISOLATED_MODEL_TYPES), "opt", "bloom"])
def test_isolated_model_types_are_exactly_the_listed_ones(model_type: str) -> None:
    """Re-checks the list on the installed transformers: two examples packed in one row, each compared with itself
    alone; the unlisted OPT and Bloom show the check tells the difference."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    first, second = torch.randint(3, 64, (7,)), torch.randint(3, 64, (5,))
    input_ids = torch.cat([first, second])[None]  # (1, 12)
    position_ids = torch.cat([torch.arange(7), torch.arange(5)])[None]  # (1, 12)
    with torch.no_grad():
        packed = model(input_ids=input_ids, position_ids=position_ids).logits[0]  # (12, V)
        alone = torch.cat([model(input_ids=first[None]).logits[0], model(input_ids=second[None]).logits[0]])
    isolated = (packed - alone).abs().max().item() < 1e-5
    assert isolated == (model_type in PACKING_ISOLATED_MODEL_TYPES)
