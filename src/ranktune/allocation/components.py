"""Static-shape rank components inside PEFT's LoRA layers: a fixed capacity, an active mask, a gate between A and B.

Each adapted module keeps `capacity` rank components for the whole run. Ranks move by switching components on and
off in a boolean mask, never by creating tensors, so the optimizer state of every surviving component is kept, DDP
sees the same parameters at every step, and checkpoints resume exactly. The forward pass uses only the active
components (a slice when they are a prefix, a gather otherwise), so compute follows the active rank.

The gate (a parameter) and the mask (a buffer) are named `lora_gate` / `lora_mask` on the `lora_A` module: PEFT's
checkpoint saving keeps every `lora_` tensor, so they travel with the adapter weights. The gate is created with
requires_grad False, so the Trainer's optimizer and DDP's gradient reducer (both built from the parameters that
require grad when training starts) leave it out; the allocation strategy switches its gradient on in
`on_train_begin`, then steps it and reduces it across processes itself.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"

# PEFT takes any 1-D tensor under lora_A for an unsharded ZeRO-3 / FSDP shard; our gate and mask are 1-D by design.
warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape: \S+\.lora_A\.lora_(gate|mask):")


class GatedLoraA(nn.Linear):
    """lora_A with `capacity` rows: h = (x @ A[active].T) * gate[active]."""

    def __init__(self, in_features: int, capacity: int, device=None, dtype=None) -> None:
        super().__init__(in_features, capacity, bias=False, device=device, dtype=dtype)
        self.lora_gate = nn.Parameter(torch.ones(capacity, device=device), requires_grad=False)
        self.register_buffer("lora_mask", torch.zeros(capacity, dtype=torch.bool, device=device))
        self.active_index = torch.zeros(0, dtype=torch.long)
        self.prefix: int | None = 0
        self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())

    def refresh(self) -> None:
        """Recomputes the cached active index from the mask; call after any change to the mask."""
        index = self.lora_mask.nonzero().flatten()
        self.active_index = index
        count = int(index.numel())
        self.prefix = count if count == 0 or int(index[-1]) == count - 1 else None

    @property
    def rank(self) -> int:
        return int(self.active_index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            weight, gate = self.weight[: self.prefix], self.lora_gate[: self.prefix]  # (k, in), (k,)
        else:
            weight = self.weight.index_select(0, self.active_index)  # (k, in)
            gate = self.lora_gate.index_select(0, self.active_index)  # (k,)
        hidden = F.linear(x, weight)  # (..., k)
        return hidden * gate.to(hidden.dtype)


class MaskedLoraB(nn.Linear):
    """lora_B with `capacity` columns, reading only the columns its partner GatedLoraA keeps active."""

    def __init__(self, partner: GatedLoraA, out_features: int, device=None, dtype=None) -> None:
        super().__init__(partner.out_features, out_features, bias=False, device=device, dtype=dtype)
        self.__dict__["partner"] = partner  # a reference, not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # hidden (..., k)
        partner = self.partner
        if partner.prefix is not None:
            weight = self.weight[:, : partner.prefix]  # (out, k)
        else:
            weight = self.weight.index_select(1, partner.active_index)  # (out, k)
        return F.linear(hidden, weight)  # (..., out)


@dataclass
class GatedModule:
    """One adapted module as the allocation strategies see it."""

    name: str
    layer: LoraLayer
    lora_A: GatedLoraA
    lora_B: MaskedLoraB
    initial_rank: int

    @property
    def capacity(self) -> int:
        return self.lora_A.out_features

    @property
    def rank(self) -> int:
        return self.lora_A.rank

    @property
    def cost(self) -> int:
        """Trainable parameters of one rank component: a row of A plus a column of B."""
        return self.lora_A.in_features + self.lora_B.out_features

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[ADAPTER])

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) of the active components with the gate folded into A and the scaling into B; None at rank 0."""
        index = self.lora_A.active_index
        if index.numel() == 0:
            return None
        gate = self.lora_A.lora_gate[index].to(self.lora_A.weight.dtype)  # (k,)
        lora_a = self.lora_A.weight[index] * gate[:, None]  # (k, in)
        lora_b = self.lora_B.weight[:, index] * self.scaling  # (out, k)
        return lora_a.contiguous(), lora_b.contiguous()


def _init_reserve_rows(weight: torch.Tensor, start: int, generator: torch.Generator | None = None) -> None:
    """Kaiming-uniform rows, as PEFT initialises lora_A, for components not yet in use."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    rows = torch.empty(weight.shape[0] - start, weight.shape[1], dtype=torch.float32)
    rows.uniform_(-bound, bound, generator=generator)
    weight[start:] = rows.to(device=weight.device, dtype=weight.dtype)


def install_gates(model: nn.Module, capacity: int | dict[str, int]) -> list[GatedModule]:
    """Replaces lora_A / lora_B of every LoRA layer with gated, fixed-capacity versions holding the same function.

    Args:
        model: a PeftModel with a LoRA adapter named "default".
        capacity: components per module (at least its initial rank), or a capacity per module name.

    Returns:
        The gated modules, in model order.
    """
    gated = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_A:
            continue
        old_a, old_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        rank = old_a.out_features
        size = capacity[name] if isinstance(capacity, dict) else capacity
        size = max(size, rank)
        factory = {"device": old_a.weight.device, "dtype": old_a.weight.dtype}
        new_a = GatedLoraA(old_a.in_features, size, **factory)
        new_b = MaskedLoraB(new_a, old_b.out_features, **factory)
        with torch.no_grad():
            new_a.weight[:rank] = old_a.weight
            _init_reserve_rows(new_a.weight, rank)
            new_b.weight.zero_()
            new_b.weight[:, :rank] = old_b.weight
            new_a.lora_mask[:rank] = True
        new_a.refresh()
        layer.lora_A[ADAPTER], layer.lora_B[ADAPTER] = new_a, new_b
        layer.r[ADAPTER] = size
        gated.append(GatedModule(_module_path(name), layer, new_a, new_b, rank))
    return gated


def _module_path(name: str) -> str:
    """The module's name in the base model, as PEFT's rank_pattern and target_modules use it."""
    return name.removeprefix("base_model.model.")
