"""Base model and tokenizer loading: hub id, local folder or `asset:NAME`; dtype and bitsandbytes quantization."""

from __future__ import annotations

import importlib.util

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ranktune.config import ModelConfig
from ranktune.errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name_or_path: str) -> str:
    """Turns `asset:NAME` into the asset's local folder (fetching it once); other values pass through."""
    from ranktune import assets

    return assets.resolve(name_or_path)


def load_tokenizer(path: str, config: ModelConfig) -> PreTrainedTokenizerBase:
    """Loads the tokenizer and gives it a pad token (EOS) when it has none, as batching needs one."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    except (OSError, ValueError) as error:
        raise UserInputError(f"model.name_or_path: cannot load a tokenizer from '{path}': {error}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _quantization_config(config: ModelConfig) -> BitsAndBytesConfig | None:
    if config.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError(
            f"model.quantization: '{config.quantization}' needs bitsandbytes; install it with "
            "`pip install 'ranktune[quant]'`"
        )
    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute_dtype = torch.float32 if config.dtype in ("float32", "auto") else DTYPES[config.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_base_model(
    path: str,
    config: ModelConfig,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    quantize: bool = True,
) -> PreTrainedModel:
    """Loads the model for the task: a causal LM, or a sequence classifier with a new head of len(label_names).

    Args:
        path: a resolved local folder or hub id.
        config: the `model` section.
        label_names: class names in id order (classification only).
        pad_token_id: set on the model config, as classifiers on decoder models need it to find the last token.
        quantize: False loads full precision even when the config asks for bitsandbytes (merging needs that).
    """
    kwargs = {
        "dtype": DTYPES[config.dtype],
        "trust_remote_code": config.trust_remote_code,
        "revision": config.revision,
    }
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    quantization = _quantization_config(config) if quantize else None
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if config.task == "classification":
        if not label_names:
            raise ValueError("a classifier needs its label names")
        model_class = AutoModelForSequenceClassification
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    else:
        model_class = AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise UserInputError(f"model.name_or_path: cannot load '{path}' as a {config.task} model: {error}") from None
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model
