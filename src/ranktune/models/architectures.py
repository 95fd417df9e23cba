"""Where each supported transformer family keeps its layers, sub-layers and projections.

HeteroLoRA's shortcut connections and its per-module settings speak of a layer's parts by role, not by the
family's own names. One table here maps the roles onto each family's module paths, relative to one layer:

- `attention_output`: the module whose output is the attention sub-layer's result, before the residual add (after
  the sub-layer's dropout module where the family has one; OPT's dropout is functional, so there the shortcut terms
  pass through the sub-layer's dropout in training);
- `ffn_input`: the module whose first input is the residual stream entering the FFN sub-layer (h_i);
- `ffn_output`: the module whose output is the FFN sub-layer's result, before the residual add;
- `projections`: the reference's abstract projection names (q_proj, k_proj, v_proj, o_proj, w1, w2, gate).

Nothing of the families' code is copied; the paths are read off their transformers implementations.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from ranktune.errors import UserInputError

ABSTRACT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "gate")


@dataclass(frozen=True)
class Architecture:
    """One family's layer list (relative to the backbone) and the roles' paths inside one layer."""

    family: str
    layers: str
    attention_output: str
    ffn_input: str
    ffn_output: str
    projections: dict[str, str]


_LLAMA = Architecture(
    family="llama",
    layers="layers",
    attention_output="self_attn",
    ffn_input="post_attention_layernorm",
    ffn_output="mlp",
    projections={
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "w1": "mlp.up_proj",
        "w2": "mlp.down_proj",
        "gate": "mlp.gate_proj",
    },
)
_GPT2 = Architecture(
    family="gpt2",
    layers="h",
    attention_output="attn",
    ffn_input="ln_2",
    ffn_output="mlp",
    projections={"o_proj": "attn.c_proj", "w1": "mlp.c_fc", "w2": "mlp.c_proj"},  # q, k, v are one fused c_attn
)
_OPT_PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.out_proj",
    "w1": "fc1",
    "w2": "fc2",
}
# OPT flattens the FFN's input to (batch·tokens, d): before LayerNorm (pre-LN) it enters final_layer_norm, after it
# (post-LN, as in OPT-350m) it enters fc1.
_OPT_PRE_LN = Architecture("opt", "decoder.layers", "self_attn", "final_layer_norm", "fc2", _OPT_PROJECTIONS)
_OPT_POST_LN = Architecture("opt", "decoder.layers", "self_attn", "fc1", "fc2", _OPT_PROJECTIONS)
_BERT = Architecture(
    family="bert",
    layers="encoder.layer",
    attention_output="attention.output.dropout",
    ffn_input="intermediate",
    ffn_output="output.dropout",
    projections={
        "q_proj": "attention.self.query",
        "k_proj": "attention.self.key",
        "v_proj": "attention.self.value",
        "o_proj": "attention.output.dense",
        "w1": "intermediate.dense",
        "w2": "output.dense",
    },
)
_FAMILIES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _BERT,
}
SUPPORTED_MODEL_TYPES = (*_FAMILIES, "opt")


def architecture_of(model: PreTrainedModel, purpose: str = "shortcut connections") -> Architecture:
    """The table entry for a transformers model (the bare HF model, not a PeftModel wrapper).

    Raises:
        UserInputError: the model's family is not one we know the layout of.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type == "opt":
        return _OPT_PRE_LN if model.config.do_layer_norm_before else _OPT_POST_LN
    if model_type in _FAMILIES:
        return _FAMILIES[model_type]
    raise UserInputError(
        f"{purpose} are not available for model type '{model_type}'; supported model types: "
        f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
    )


def transformer_layers(model: PreTrainedModel, architecture: Architecture) -> tuple[str, nn.ModuleList]:
    """The layer list and its full name in `model` (`model.layers`, `bert.encoder.layer`, `transformer.h`, ...)."""
    layers = model.base_model.get_submodule(architecture.layers)
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise AssertionError("the backbone's layer list is not a submodule of the model")  # pragma: no cover


def hidden_size(model: PreTrainedModel) -> int:
    """The width d of the residual stream."""
    return int(model.config.hidden_size)
