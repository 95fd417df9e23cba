"""HeteroLoRA's shortcut connections: low-rank d×d maps added around and across transformer sub-layers, by hooks.

Per layer i (hidden size d) each connection adds s · B A (source) with A: d → r, B: r → d, s = alpha / r:

- residual1: the residual path around attention becomes (I + sBA) x_i, so sBA(x_i) is added to the attention output;
- residual2: the residual path around the FFN becomes (I + sBA) h_i, so sBA(h_i) is added to the FFN output;
- shortcut1: from the layer's input x_i to its FFN output;
- shortcut2: from the previous layer's FFN input h_(i-1) to this layer's attention output (absent in layer 0).

x_i is the layer's input and h_i the residual stream entering the FFN sub-layer. Nothing of the models' own code is
copied or patched: forward pre-hooks capture x_i and h_i, forward hooks add the terms to the attention and FFN
outputs before the residual add (in post-LN models, before the LayerNorm that follows it). Where each family keeps
those points is in `models/architectures.py`.

B starts at zero, and a disabled connection has its mask at 0, so both add an exact zero: a model whose connections
are all zero-initialised or disabled computes exactly the base model's function, bit for bit. A disabled connection
still runs (static shapes: DDP sees the same parameters every step, no find_unused_parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ranktune.adapters.shortcut_types import SHORTCUT_KINDS, ShortcutSpec
from ranktune.errors import UserInputError
from ranktune.models.architectures import Architecture, architecture_of, hidden_size, transformer_layers

ATTRIBUTE = "ranktune_shortcuts"  # where the set hangs in the base model, so its parameters are the model's


class LowRankShortcut(nn.Module):
    """s · B(A(dropout(x))) · mask, with A kaiming-uniform (as PEFT's lora_A) and B zero."""

    def __init__(self, width: int, spec: ShortcutSpec) -> None:
        super().__init__()
        self.spec = spec
        self.A = nn.Parameter(torch.empty(spec.r, width))  # (r, d)
        self.B = nn.Parameter(torch.zeros(width, spec.r))  # (d, r)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.alpha / spec.r
        self.register_buffer("mask", torch.ones(()), persistent=False)  # 1 enabled, 0 disabled

    @property
    def enabled(self) -> bool:
        return bool(self.mask)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.mask.fill_(1.0 if value else 0.0)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        # Masking the input, not the output: a disabled connection adds an exact zero even where x·A·B would
        # overflow in half precision (inf · 0 is NaN).
        x = self.dropout(source.to(self.A.dtype)) * self.mask  # (..., d)
        return (x @ self.A.T @ self.B.T) * self.scaling  # (..., d)


def connection_name(layers_path: str, index: int, kind: str) -> str:
    """The connection's name in the base model, beside the layer's modules: `model.layers.3.residual1`."""
    return f"{layers_path}.{index}.{kind}"


class ShortcutSet(nn.Module):
    """Every shortcut connection of one model and the hooks that run them.

    Connections are kept as `connections[str(layer)][kind]`; `named_connections()` gives them by their names in
    the base model (`model.layers.3.residual1`), the names used in scores, plans, histories and saved files.
    """

    def __init__(self, model: PreTrainedModel, specs: dict[tuple[int, str], ShortcutSpec]) -> None:
        super().__init__()
        architecture = architecture_of(model)
        _check_supported_settings(model)
        self.model_type = str(model.config.model_type)
        self.layers_path, layers = transformer_layers(model, architecture)
        self.width = hidden_size(model)
        self.connections = nn.ModuleDict()
        for (index, kind), spec in specs.items():
            if str(index) not in self.connections:
                self.connections[str(index)] = nn.ModuleDict()
            self.connections[str(index)][kind] = LowRankShortcut(self.width, spec)
        self._inputs: dict[int, torch.Tensor] = {}  # x_i of the forward pass under way
        self._ffn_inputs: dict[int, torch.Tensor] = {}  # h_i
        self._handles = self._install(model, architecture, layers)

    def named_connections(self) -> Iterator[tuple[str, LowRankShortcut]]:
        """(name in the base model, connection), by layer then kind."""
        for index, kinds in self.connections.items():
            for kind in SHORTCUT_KINDS:
                if kind in kinds:
                    yield connection_name(self.layers_path, int(index), kind), kinds[kind]

    def specs(self) -> dict[tuple[int, str], ShortcutSpec]:
        return {(int(i), kind): c.spec for i, kinds in self.connections.items() for kind, c in kinds.items()}

    def _get(self, index: int, kind: str) -> LowRankShortcut | None:
        kinds = self.connections[str(index)] if str(index) in self.connections else None  # noqa: SIM401 - no .get
        return kinds[kind] if kinds is not None and kind in kinds else None

    def _install(self, model: PreTrainedModel, architecture: Architecture, layers: nn.ModuleList) -> list[Any]:
        # The captured activations are dropped when the next forward pass starts, not when this one ends: gradient
        # checkpointing re-runs layers during backward and needs them again. Without autograd (evaluation,
        # generation) nothing re-runs, so they are dropped at once.
        handles = [
            model.register_forward_pre_hook(lambda module, args: self._forget()),
            model.register_forward_hook(
                lambda module, args, output: None if torch.is_grad_enabled() else self._forget()
            ),
        ]
        for index, layer in enumerate(layers):
            if str(index) not in self.connections and str(index + 1) not in self.connections:
                continue
            handles += [
                layer.register_forward_pre_hook(self._keep_layer_input(index), with_kwargs=True),
                layer.get_submodule(architecture.ffn_input).register_forward_pre_hook(self._keep_ffn_input(index)),
                layer.get_submodule(architecture.attention_output).register_forward_hook(self._add_to_attention(index)),
                layer.get_submodule(architecture.ffn_output).register_forward_hook(self._add_to_ffn(index)),
            ]
        return handles

    def _forget(self) -> None:
        self._inputs.clear()
        self._ffn_inputs.clear()

    def _keep_layer_input(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _keep_ffn_input(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._ffn_inputs[index] = args[0]

        return hook

    @staticmethod
    def _added(main: torch.Tensor, terms: list[tuple[LowRankShortcut | None, torch.Tensor | None]]) -> torch.Tensor:
        total = main
        for connection, source in terms:
            if connection is not None and source is not None:
                total = total + connection(source).reshape(main.shape).to(main.dtype)  # OPT flattens to (N, d)
        return total

    def _add_to_attention(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            main = output[0] if isinstance(output, tuple) else output
            main = self._added(
                main,
                [
                    (self._get(index, "residual1"), self._inputs.get(index)),
                    (self._get(index, "shortcut2"), self._ffn_inputs.get(index - 1)),
                ],
            )
            return (main, *output[1:]) if isinstance(output, tuple) else main

        return hook

    def _add_to_ffn(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return self._added(
                output,
                [
                    (self._get(index, "residual2"), self._ffn_inputs.get(index)),
                    (self._get(index, "shortcut1"), self._inputs.get(index)),
                ],
            )

        return hook


def _check_supported_settings(model: PreTrainedModel) -> None:
    """Refuses model settings under which the hooks would see partial sub-layers or skipped layers."""
    if getattr(model.config, "chunk_size_feed_forward", 0):
        raise UserInputError(
            "shortcut connections need the FFN applied to whole sequences; set the model's chunk_size_feed_forward to 0"
        )
    if getattr(model.config, "layerdrop", 0.0):
        raise UserInputError(
            "shortcut connections need every layer to run (a dropped layer leaves its connections without gradients); "
            "set the model's layerdrop to 0"
        )


def bare_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a PeftModel (or the model itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if isinstance(inner, PreTrainedModel) and hasattr(model, "peft_config") else model


def install_shortcuts(model: nn.Module, specs: dict[tuple[int, str], ShortcutSpec]) -> ShortcutSet:
    """Adds the connections to `model` (a transformers model or a PeftModel; install after PEFT has wrapped it, so
    the hooks see LoRA's output too); their parameters become the model's, trainable.

    Raises:
        UserInputError: the model's family has no known layout (the message names the supported ones), or a model
            setting the hooks cannot follow.
        ValueError: the model already has shortcut connections.
    """
    base = bare_model(model)
    if hasattr(base, ATTRIBUTE):
        raise ValueError("the model already has shortcut connections")
    reference = next(base.parameters())
    shortcuts = ShortcutSet(base, specs).to(reference.device)
    setattr(base, ATTRIBUTE, shortcuts)
    return shortcuts


def find_shortcuts(model: nn.Module) -> ShortcutSet | None:
    """The model's shortcut connections, if it has any."""
    return getattr(bare_model(model), ATTRIBUTE, None)
