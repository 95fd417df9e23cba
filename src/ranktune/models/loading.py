"""Base model and tokenizer loading: hub id, local folder or `asset:NAME`; dtype and bitsandbytes quantization.

Python code shipped with a model or tokenizer runs only when the person running ranktune asked for it: the caller
passes that choice in `ModelConfig.trust_remote_code`, and `trust_option` says how to make it (the config key for
`train`, the command-line flag for the commands that load an adapter) in the refusal.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ranktune.config import ModelConfig
from ranktune.errors import UserInputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
TRUST_IN_CONFIG = "set model.trust_remote_code: true"


def resolve_model_path(name_or_path: str) -> str:
    """Turns `asset:NAME` into the asset's local folder (fetching it once); other values pass through."""
    from ranktune import assets

    return assets.resolve(name_or_path)


def looks_local(name_or_path: str) -> bool:
    """Whether a model reference can only be a local path (a hub id is `name` or `owner/name`)."""
    return os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1


class ModelNotFound(UserInputError):
    """No model config at a path: no such local folder, and the hub has no such model or cannot be reached.

    Attributes:
        reason: the first sentence of the library's own explanation.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def one_line(error: Exception) -> str:
    """A library's message (often several lines, with hints for its own API) as one line."""
    return " ".join(str(error).split())


def custom_code_error(where: str, path: str, trust_option: str) -> UserInputError:
    """The refusal to load a model or tokenizer whose classes are Python code of its own."""
    return UserInputError(
        f"{where}: '{path}' needs Python code of its own (custom model or tokenizer classes), which ranktune runs "
        f"only when you ask: {trust_option} if you trust that code"
    )


def _needs_custom_code(error: Exception) -> bool:
    # transformers' refusal (ValueError) asks to pass `trust_remote_code=True`.
    return "trust_remote_code" in str(error)


def _check_exists(path: str, where: str) -> None:
    if looks_local(path) and not Path(path).exists():
        raise UserInputError(f"{where}: '{path}' does not exist (expected a local model folder or a hub id)")


def load_model_config(
    path: str, config: ModelConfig, where: str = "model.name_or_path", trust_option: str = TRUST_IN_CONFIG
) -> PretrainedConfig:
    """The model's config.json (architecture, special token ids), custom code refused unless trusted.

    Raises:
        ModelNotFound: no model config at `path`, locally or on the hub.
        UserInputError: the model config is unreadable, or it needs code the user did not allow.
    """
    _check_exists(path, where)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code, revision=config.revision)
    except OSError as error:
        reason = one_line(error)
        raise ModelNotFound(
            f"{where}: cannot read the model config of '{path}': {reason}", reason.split(". ")[0].rstrip(".")
        ) from None
    except ValueError as error:
        if _needs_custom_code(error):
            raise custom_code_error(where, path, trust_option) from None
        raise UserInputError(f"{where}: cannot read the model config of '{path}': {one_line(error)}") from None


def _give_eos(tokenizer: PreTrainedTokenizerBase, pretrained_config: PretrainedConfig) -> None:
    """An EOS token for a tokenizer without one: the model config's `eos_token_id`, else the SEP token."""
    eos_id = getattr(pretrained_config, "eos_token_id", None)
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    known = isinstance(eos_id, int) and 0 <= eos_id < len(tokenizer)
    token = tokenizer.convert_ids_to_tokens(eos_id) if known else None
    source = f"the model config's eos_token_id {eos_id}"
    if token is None and tokenizer.sep_token is not None:
        token, source = tokenizer.sep_token, "its SEP token"
    if token is not None:
        tokenizer.eos_token = token
        print(f"[ranktune] the tokenizer has no EOS token; using '{token}' ({source})", file=sys.stderr)


def load_tokenizer(
    path: str,
    config: ModelConfig,
    pretrained_config: PretrainedConfig | None = None,
    where: str = "model.name_or_path",
    trust_option: str = TRUST_IN_CONFIG,
) -> PreTrainedTokenizerBase:
    """Loads the tokenizer and gives it the special tokens batching and causal-LM data need.

    A causal LM's tokenizer without an EOS token takes the model config's `eos_token_id` (else its SEP token); one
    with neither is refused here, before the model loads, as every causal-LM example ends in EOS. The pad
    token, when missing, is EOS (else UNK).

    Args:
        path: the tokenizer's folder or hub id.
        config: the `model` section (task, trust_remote_code, revision).
        pretrained_config: the model's config when the tokenizer is stored elsewhere (an adapter folder); by
            default read from `path`.
        where: what named the path, for messages (`model.name_or_path`).
        trust_option: how the user allows custom code, for the refusal.

    Raises:
        UserInputError: the path does not exist, holds no tokenizer or model config, needs custom code the user did
            not allow, or a causal LM's tokenizer has no EOS token.
    """
    _check_exists(path, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
    except (OSError, ValueError) as error:
        if _needs_custom_code(error):
            raise custom_code_error(where, path, trust_option) from None
        raise UserInputError(f"{where}: cannot load a tokenizer from '{path}': {one_line(error)}") from None
    if pretrained_config is None:
        pretrained_config = load_model_config(path, config, where, trust_option)
    if tokenizer.eos_token is None and config.task == "causal_lm":  # a classifier's batches need no EOS
        _give_eos(tokenizer, pretrained_config)
    if tokenizer.eos_token is None and config.task == "causal_lm":
        raise UserInputError(
            f"{where}: the tokenizer of '{path}' has no EOS token, and neither the model config (eos_token_id) nor a "
            'SEP token names one; causal-LM examples end in EOS: add "eos_token": "<a token of its vocabulary>" '
            "to tokenizer_config.json in a local copy of the model"
        )
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


def saved_head_rows(folder: str | Path) -> int | None:
    """The row count (labels) of the classification head saved in a folder's safetensors files; None if none."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as tensors:
                for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if key in HEAD_SUFFIXES or key.endswith(tuple(f".{suffix}" for suffix in HEAD_SUFFIXES)):
                        return tensors.get_slice(key).get_shape()[0]
        except (OSError, SafetensorError):
            continue
    return None


def _shape_mismatch(path: str, where: str, label_names: list[str] | None) -> UserInputError:
    """transformers refused saved weights of other shapes than the model it built: a classification head for
    another number of labels, or weights that do not fit the folder's own config.json."""
    rows = saved_head_rows(path) if label_names and Path(path).is_dir() else None
    if label_names and rows is not None and rows != len(label_names):
        return UserInputError(
            f"{where}: '{path}' has a classification head for {rows} labels, but {len(label_names)} labels are "
            f"needed here ({', '.join(label_names)}); use a model without that head, or one trained for these labels"
        )
    return UserInputError(f"{where}: '{path}' holds weights whose shapes do not match its config.json")


def load_base_model(
    path: str,
    config: ModelConfig,
    label_names: list[str] | None = None,
    pad_token_id: int | None = None,
    quantize: bool = True,
    where: str = "model.name_or_path",
    trust_option: str = TRUST_IN_CONFIG,
) -> PreTrainedModel:
    """Loads the model for the task: a causal LM, or a sequence classifier with a new head of len(label_names).

    Args:
        path: a resolved local folder or hub id.
        config: the `model` section.
        label_names: class names in id order (classification only).
        pad_token_id: set on the model config, as classifiers on decoder models need it to find the last token.
        quantize: False loads full precision even when the config asks for bitsandbytes (merging needs that).
        where: what named the path, for messages.
        trust_option: how the user allows custom code, for the refusal.

    Raises:
        UserInputError: the path does not hold such a model, needs custom code the user did not allow, or its
            saved classification head has another number of labels.
    """
    _check_exists(path, where)
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
        if _needs_custom_code(error):
            raise custom_code_error(where, path, trust_option) from None
        raise UserInputError(f"{where}: cannot load '{path}' as a {config.task} model: {one_line(error)}") from None
    except RuntimeError as error:
        if "ignore_mismatched_sizes" in str(error):
            raise _shape_mismatch(path, where, label_names) from None
        raise
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model
