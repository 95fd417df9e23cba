"""EVA on PEFT's implementation, with the inputs chosen for both of our tasks.

PEFT's default chooses the tokens to decompose by the attention mask and, with `use_label_mask`, by labels that are
not -100: right for causal LM batches, whose labels are per token. A classification batch's labels are one class id
per row, which that mask would misread, so for classification only the attention mask chooses. A module that sees
one vector per row rather than per token (BERT's pooler) decomposes every row.

Under DDP, PEFT gathers every process's layer inputs before each incremental SVD step (`gather_distributed_inputs`),
so every process should decompose the same inputs and choose the same ranks (not yet checked in a two-process run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from peft import EvaConfig, PeftModel, initialize_lora_eva_weights
from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling
from transformers import PreTrainedModel

from ranktune.adapters.lora import attach_peft, build_lora_config
from ranktune.allocation.methods.eva import EvaSettings
from ranktune.allocation.saliency import Batch
from ranktune.config import RunConfig
from ranktune.errors import RuntimeFailure


def eva_config(settings: EvaSettings) -> EvaConfig:
    """PEFT's EvaConfig with the same knobs."""
    knobs = ("rho", "tau", "whiten", "use_label_mask", "adjust_scaling_factors")  # the rest are ranktune's
    return EvaConfig(**{name: getattr(settings, name) for name in knobs})


def _tokens_without_labels(model_input: dict[str, Any], peft_config: Any) -> Any:
    """PEFT's token choice from the attention mask alone (a classifier's labels are not per token)."""
    return prepare_model_inputs_fn_language_modeling(
        {key: value for key, value in model_input.items() if key != "labels"}, peft_config
    )


def _layer_inputs(layer_input: Any, tokens: torch.Tensor, layer_name: str) -> torch.Tensor:
    """The rows of a module's input to decompose: the chosen tokens (`tokens`: (n, 2) row and position indices) of
    a (B, T, d) input; every row of a (B, d) input."""
    inputs = layer_input[0] if isinstance(layer_input, tuple | list) else layer_input
    if inputs.dim() == 2:
        return inputs.contiguous()  # (B, d); BERT pools a strided view of the first token
    return inputs[tokens.T.unbind()]  # (n, d)


def _bounded_forward(batches: int, max_passes: int) -> Callable[[Any, dict[str, Any]], Any]:
    """PEFT's forward pass, refusing to go on after `max_passes` passes over the batches: PEFT cycles over them
    until every component has converged, which never happens when a module sees fewer rows per batch than it has
    components."""
    calls = 0

    def forward(model: Any, inputs: dict[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        if calls > batches * max_passes:
            raise RuntimeFailure(
                f"EVA did not converge in {max_passes} passes over {batches} calibration batches; raise "
                "allocation.batches or allocation.max_passes, or lower allocation.tau"
            )
        return model(**inputs)

    return forward


def attach_eva_lora(
    model: PreTrainedModel,
    config: RunConfig,
    settings: EvaSettings,
    batches: list[Batch],
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """LoRA on the `lora` section's targets, then EVA's ranks and initial A (B stays 0: training starts from the
    base model). Modules that EVA gives rank 0 lose their LoRA layer."""
    lora_config = build_lora_config(config.lora, config.model.task)
    lora_config = dataclasses.replace(lora_config, init_lora_weights="eva", eva_config=eva_config(settings))
    peft_model = attach_peft(model, lora_config, gradient_checkpointing)
    choose_tokens = _tokens_without_labels if config.model.task == "classification" else None
    initialize_lora_eva_weights(
        peft_model,
        dataloader=[dict(batch) for batch in batches],  # PEFT wants dicts; collators may give a BatchEncoding
        forward_fn=_bounded_forward(len(batches), settings.max_passes),
        prepare_model_inputs_fn=choose_tokens or prepare_model_inputs_fn_language_modeling,
        prepare_layer_inputs_fn=_layer_inputs,
        show_progress_bar=False,
    )
    return peft_model
