"""Causal language modelling examples: token ids, and labels that say which tokens the loss is computed on.

Three formats:
- "text": documents, each followed by EOS, concatenated and cut into blocks of `max_length`; loss on every token.
- "prompt_completion": prompt + completion + EOS; loss on the completion and EOS only.
- "chat": a conversation rendered by the tokenizer's chat template; loss on the assistant turns only. The assistant
  spans are found by rendering message prefixes, so any template works (no `{% generation %}` markers needed).

Packing (`data.packing`) puts several examples (documents, for "text") into one row of at most `max_length` tokens
(best-fit decreasing, `trl.pack_dataset`) with `position_ids` that restart at 0 for each example. Given position_ids
and no attention_mask, transformers' mask builder (`masking_utils.find_packed_sequence_indices`) makes a
block-diagonal causal mask, so examples do not attend to each other: each packed example gets the logits it gets
alone. That needs the model's `use_cache` off (the Trainer's default). Model types whose attention ignores the
restarting positions (OPT, Falcon, Bloom, ...) get one warning.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from trl import pack_dataset

from ranktune.config import DataConfig
from ranktune.data.sources import require_columns, require_texts
from ranktune.errors import UserInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value the loss skips

# Model types whose eager/sdpa attention builds a block-diagonal mask from restarting position_ids (given
# attention_mask=None and no cache): their decoders pass position_ids to `create_causal_mask`. Verified with
# transformers 5.24 (the floor in pyproject.toml; Falcon joined the list in 5.24) on tiny random models: two packed
# examples get the logits each gets alone (max abs diff < 1e-6). OPT, Bloom, MPT, XGLM, BioGPT and GPT-OSS do not
# isolate; tests/data/test_causal_lm.py re-checks the list on the installed transformers.
PACKING_ISOLATED_MODEL_TYPES = frozenset(
    {
        "apertus", "arcee", "bitnet", "codegen", "cohere", "exaone4", "falcon", "gemma", "gemma2", "gemma3_text",
        "glm", "glm4", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite", "lfm2", "llama", "mistral",
        "mixtral", "olmo", "olmo2", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "smollm3",
        "stablelm", "starcoder2",
    }
)  # fmt: skip

_FORMAT_COLUMNS = {
    "text": ("text_column",),
    "prompt_completion": ("prompt_column", "completion_column"),
    "chat": ("messages_column",),
}


def detect_format(dataset: Dataset, config: DataConfig) -> str:
    """The causal LM format of a dataset: "text", "prompt_completion" or "chat".

    `config.format` "auto" picks by columns: messages > prompt + completion > text.

    Raises:
        UserInputError: the format's columns are missing (listing the existing ones), or the format is
            "classification".
    """
    if config.format == "classification":
        raise UserInputError("data.format 'classification' needs model.task: classification")
    if config.format != "auto":
        require_columns(dataset, "train", _format_columns(config.format, config))
        return config.format
    for data_format in ("chat", "prompt_completion", "text"):
        if all(column in dataset.column_names for column in _format_columns(data_format, config).values()):
            return data_format
    raise UserInputError(
        f"cannot tell the data format: the train split has columns {', '.join(dataset.column_names)}; expected "
        f"'{config.messages_column}' (chat), '{config.prompt_column}' + '{config.completion_column}' "
        f"(prompt_completion) or '{config.text_column}' (text), or set data.format and the column names"
    )


def prepare_causal_lm(
    splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, config: DataConfig, model_type: str | None = None
) -> DatasetDict:
    """Tokenizes every split into rows of input_ids and labels (and position_ids when packing).

    Args:
        splits: the raw splits; the format is detected on "train".
        tokenizer: with a pad token; a chat template for the chat format.
        config: format, columns, `max_length` and `packing`.
        model_type: the model's `config.model_type`, to warn when packing cannot isolate examples.

    Returns:
        The splits with columns input_ids and labels (-100 where no loss), plus position_ids when packing.

    Raises:
        UserInputError: missing columns, malformed examples, no chat template, or a split left without any token
            to train on.
    """
    data_format = detect_format(splits["train"], config)
    if data_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise UserInputError(
            "the chat format needs a tokenizer with a chat template, and this model's tokenizer has none; "
            "use a chat model, or the prompt_completion / text format"
        )
    if config.packing:
        _warn_if_not_isolated(model_type)
    prepared = {}
    for name, split in splits.items():
        require_columns(split, name, _format_columns(data_format, config))
        rows = _EXAMPLE_BUILDERS[data_format](split, name, tokenizer, config)
        if config.packing:
            rows = _pack(rows, config.max_length, split_long=data_format == "text")
        elif data_format == "text":
            rows = _chunk(rows, config.max_length)
        prepared[name] = rows
    return DatasetDict(prepared)


def _format_columns(data_format: str, config: DataConfig) -> dict[str, str]:
    return {f"data.{key}": getattr(config, key) for key in _FORMAT_COLUMNS[data_format]}


def _warn_if_not_isolated(model_type: str | None) -> None:
    if model_type in PACKING_ISOLATED_MODEL_TYPES:
        return
    logger.warning(
        "data.packing: model type '%s' does not keep packed examples apart (its attention ignores the restarting "
        "position_ids), so attention crosses example boundaries inside each packed row; set data.packing: false "
        "to train on every example alone",
        model_type or "unknown",
    )


# --- one row per example --------------------------------------------------------------------------------------


def _text_examples(split: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> Dataset:
    """One row per non-empty document: its tokens + EOS, labels = input_ids."""

    def encode(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[list[int]]]:
        texts = [
            text for text in require_texts(batch[config.text_column], name, config.text_column, rows) if text.strip()
        ]
        ids = [_with_eos(doc, tokenizer) for doc in tokenizer(texts)["input_ids"]] if texts else []
        return {"input_ids": ids, "labels": ids}

    rows = split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names)
    if len(rows) == 0:
        raise UserInputError(f"the {name} split has no text: every '{config.text_column}' value is empty")
    return rows


def _prompt_completion_examples(
    split: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig
) -> Dataset:
    """prompt + completion + EOS, cut to max_length; labels -100 on the prompt. Rows with no completion token left
    (the prompt fills max_length) are dropped."""

    def encode(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[list[int]]]:
        prompts = tokenizer(require_texts(batch[config.prompt_column], name, config.prompt_column, rows))["input_ids"]
        completions = tokenizer(
            require_texts(batch[config.completion_column], name, config.completion_column, rows),
            add_special_tokens=False,
        )["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for prompt, completion in zip(prompts, completions, strict=True):
            completion = _with_eos(completion, tokenizer)
            _append_if_trainable(out, prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, config.max_length)
        return out

    rows = split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names)
    return _check_kept(rows, split, name, config.max_length, "the prompt fills max_length")


def _chat_examples(split: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig) -> Dataset:
    """A conversation rendered by the chat template, cut to max_length; labels only on the assistant turns (their
    content and the template's end-of-turn text). Rows with no assistant token left are dropped."""

    def encode(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[list[int]]]:
        rendered = [
            _render_chat(_messages(value, name, config.messages_column, row), tokenizer, name, row)
            for value, row in zip(batch[config.messages_column], rows, strict=True)
        ]
        encoded = tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=False,  # the template writes the special tokens itself
            truncation=True,
            max_length=config.max_length,
            return_offsets_mapping=True,
        )
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered, strict=True):
            labels = [
                token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
                for token, (begin, _) in zip(ids, offsets, strict=True)
            ]
            _append_if_trainable(out, ids, labels, config.max_length)
        return out

    if not tokenizer.is_fast:
        raise UserInputError("the chat format needs a fast tokenizer (for character offsets); this model's is slow")
    rows = split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names)
    return _check_kept(rows, split, name, config.max_length, "there is no assistant turn within max_length")


_EXAMPLE_BUILDERS: dict[str, Callable[[Dataset, str, PreTrainedTokenizerBase, DataConfig], Dataset]] = {
    "text": _text_examples,
    "prompt_completion": _prompt_completion_examples,
    "chat": _chat_examples,
}


def _render_chat(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, split: str, row: int
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns.

    A turn's span starts where the conversation before it, rendered with the generation prompt (the assistant
    header), stops matching the full text, and ends where the conversation up to it stops matching. Templates that
    render earlier turns differently from the last one only narrow the span, never widen it onto other turns.
    """

    def render(part: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as error:
            raise UserInputError(
                f"the {split} split, example {row}: the chat template rejected the conversation: {error}"
            ) from None

    full = render(messages)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            # A conversation cannot be rendered empty, so an opening assistant turn starts at 0 (header included).
            start = _common_prefix_length(full, render(messages[:turn], generation_prompt=True)) if turn else 0
            spans.append((start, _common_prefix_length(full, render(messages[: turn + 1]))))
    return full, spans


def _common_prefix_length(text: str, other: str) -> int:
    length = min(len(text), len(other))
    return next((i for i in range(length) if text[i] != other[i]), length)


def _messages(value: Any, split: str, column: str, row: int) -> list[dict[str, Any]]:
    """Checks a conversation's shape: a non-empty list of {"role": str, "content": ...} messages."""
    well_formed = (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )
    if not well_formed:
        raise UserInputError(
            f"the {split} split, example {row}: column '{column}' must hold a list of messages "
            f'{{"role": ..., "content": ...}}, got {value!r:.200}'
        )
    return value


def _with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids followed by EOS (once: tokenizers that already end with EOS keep theirs)."""
    return ids if ids and ids[-1] == tokenizer.eos_token_id else [*ids, tokenizer.eos_token_id]


def _append_if_trainable(out: dict[str, list[list[int]]], ids: list[int], labels: list[int], max_length: int) -> None:
    ids, labels = ids[:max_length], labels[:max_length]
    if any(label != IGNORE_INDEX for label in labels):
        out["input_ids"].append(ids)
        out["labels"].append(labels)


def _check_kept(rows: Dataset, split: Dataset, name: str, max_length: int, reason: str) -> Dataset:
    dropped = len(split) - len(rows)
    if len(rows) == 0:
        raise UserInputError(
            f"the {name} split has no example left to train on: in all {len(split)} examples {reason} "
            f"({max_length} tokens); raise data.max_length or shorten the examples"
        )
    if dropped:
        logger.warning(
            "the %s split: dropped %d of %d examples because %s (%d tokens)",
            name,
            dropped,
            len(split),
            reason,
            max_length,
        )
    return rows


# --- rows of max_length -----------------------------------------------------------------------------------------


def _chunk(rows: Dataset, max_length: int) -> Dataset:
    """Concatenates the documents and cuts blocks of max_length; the last partial block is dropped unless it is the
    only one."""
    tokens = pc.list_flatten(rows.with_format("arrow")["input_ids"]).to_numpy()  # (total,)
    size = min(max_length, len(tokens))  # one short block when the whole text is shorter than max_length
    blocks = len(tokens) // size
    offsets = np.arange(blocks + 1, dtype=np.int64) * size  # (blocks + 1,)
    column = pa.LargeListArray.from_arrays(offsets, pa.array(tokens[: blocks * size], type=pa.int64()))
    return Dataset(pa.table({"input_ids": column, "labels": column}))


def _pack(rows: Dataset, max_length: int, split_long: bool) -> Dataset:
    """Packs examples into rows of at most max_length tokens with position_ids restarting at 0 per example.

    The first label of every example is -100: in a packed row it would be predicted from the previous example's
    last token. `split_long` cuts examples longer than max_length into pieces instead of truncating them.
    """
    packed = pack_dataset(rows, max_length, strategy="bfd_split" if split_long else "bfd")

    def positions(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        position_ids, labels = [], []
        for row_labels, lengths in zip(batch["labels"], batch["seq_lengths"], strict=True):
            position_ids.append([i for length in lengths for i in range(length)])
            starts = set(itertools.accumulate(lengths[:-1], initial=0))
            labels.append([IGNORE_INDEX if i in starts else label for i, label in enumerate(row_labels)])
        return {"position_ids": position_ids, "labels": labels}

    return packed.map(positions, batched=True, remove_columns=["seq_lengths"])
