"""AdaLoRA on PEFT's own layers and RankAllocator, wired where users usually get it wrong.

PEFT's AdaLoRA keeps each module's A (r, in), E (r, 1) and B (out, r) at `init_r` for the whole run and masks
components by zeroing entries of E: static shapes by construction. What PEFT leaves to the user, this strategy does:

- `update_and_allocate` runs at `on_optimizer_step`, after optimizer.step() and before zero_grad, with the number of
  the optimizer step just taken (1-based, so the final mask falls on the last step even with `tfinal: 0`).
- `total_step` is the Trainer's own `max_steps`; `tinit` / `tfinal` may be given as fractions of it.
- The orthogonal regulariser, which PEFT adds inside the model's forward only when the output carries a loss (and
  which the Trainer's loss scaling then multiplies), is added to the gradients once per optimizer step instead.
- The budget's masks live here, not in `peft_config.rank_pattern`: PEFT resizes a saved AdaLoRA adapter to that
  pattern, which would make checkpoints lose the masked components and their optimizer state.
- The export folds E and the scale into vanilla LoRA factors:
  A' = (A · E)[kept], B' = B[:, kept] · alpha / (ranknum + 1e-5).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel
from peft.tuners.adalora import AdaLoraLayer

from ranktune.allocation.methods.adalora import AdaLoRASettings
from ranktune.allocation.strategy import FoldedFactors, HistoryRow, RankSnapshot, Totals
from ranktune.errors import UserInputError

ADAPTER = "default"
RANKNUM_EPSILON = 1e-5  # PEFT's AdaLoRA divides by (ranknum + 1e-5)


def schedule_steps(settings: AdaLoRASettings, total_steps: int) -> tuple[int, int]:
    """(tinit, tfinal) in optimizer steps for a run of `total_steps`; `settings` have init_r and target_r set
    (`AdaLoRASettings.with_ranks`).

    Raises:
        UserInputError: the schedule leaves no step for the budget to shrink.
    """

    def steps(value: int | float) -> int:
        return value if isinstance(value, int) else round(value * total_steps)

    tinit, tfinal = steps(settings.tinit), steps(settings.tfinal)
    if tinit >= total_steps - tfinal or total_steps - tfinal < 2:  # the final mask needs one step of scores before it
        raise UserInputError(
            f"allocation: AdaLoRA's schedule leaves no steps to reallocate in: tinit {tinit} + tfinal {tfinal} steps "
            f"out of {total_steps} optimizer steps; lower allocation.tinit / allocation.tfinal or train longer"
        )
    return tinit, tfinal


def build_adalora_config(lora: LoraConfig, settings: AdaLoRASettings, total_steps: int) -> AdaLoraConfig:
    """PEFT's AdaLoraConfig with the LoRA settings (targets, alpha, dropout, task) of `lora` and AdaLoRA's knobs."""
    ignored = {"r", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "peft_type"}
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - ignored
    tinit, tfinal = schedule_steps(settings, total_steps)
    return AdaLoraConfig(
        **{name: getattr(lora, name) for name in lora_fields},
        init_r=settings.init_r,
        target_r=settings.target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=settings.deltaT,
        beta1=settings.beta1,
        beta2=settings.beta2,
        orth_reg_weight=settings.orth_reg_weight,
        total_step=total_steps,
    )


def orthogonal_regularizer(matrices: list[tuple[bool, torch.Tensor]]) -> torch.Tensor:
    """Mean over AdaLoRA's A and B matrices of ||P Pᵀ - I||_F (rows of A, columns of B), as PEFT's forward adds it.

    Args:
        matrices: (is it an A matrix, the matrix) for every A (r, in) and B (out, r).
    """
    total = matrices[0][1].new_zeros(())
    for is_a, weight in matrices:
        gram = weight @ weight.T if is_a else weight.T @ weight  # (r, r)
        total = total + torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    return total / len(matrices)


class AdaLoRAStrategy:
    """Drives PEFT's RankAllocator at optimizer-step boundaries and exports its result as vanilla LoRA."""

    name = "adalora"
    history_files = ()

    def __init__(self, model: PeftModel, settings: AdaLoRASettings) -> None:
        self.settings = settings
        self.tuner = model.base_model  # AdaLoraModel
        self.config: AdaLoraConfig = model.peft_config[ADAPTER]
        self.allocator = self.tuner.rankallocator
        self.layers: dict[str, AdaLoraLayer] = {
            name: layer
            for name, layer in self.tuner.model.named_modules()
            if isinstance(layer, AdaLoraLayer) and ADAPTER in layer.lora_A
        }
        self.masks: dict[str, list[bool]] | None = None  # {"<module>.lora_E.default": keep per component}
        self.config.orth_reg_weight = 0.0  # the strategy adds the regulariser itself, once per optimizer step
        self.factors = [  # (is it A, the matrix) for every trainable A and B, as the regulariser takes them
            ("lora_A" in name, p)
            for name, p in self.tuner.model.named_parameters()
            if ("lora_A" in name or "lora_B" in name) and ADAPTER in name and p.requires_grad
        ]

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> HistoryRow | None:
        """Sets `total_step` to the Trainer's run length (AdaLoRA's own `tinit` replaces warm-up)."""
        tinit, tfinal = schedule_steps(self.settings, total_steps)
        self.config.total_step, self.config.tinit, self.config.tfinal = total_steps, tinit, tfinal
        return None

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Adds `orth_reg_weight · ∇R` to the gradients, once per optimizer step.

        PEFT adds `orth_reg_weight · R` to the loss inside the model's forward, and only when the model computes the
        loss: it vanishes when the loss comes from outside (a `compute_loss_func`, label smoothing, some TRL losses),
        and the Trainer's loss scaling multiplies it by the accumulation steps and the process count when the model
        accepts loss kwargs. Here it is added once per step to the synchronized gradients (identical on every
        process), whatever computed the loss. It is added after gradient clipping, so it is not clipped.
        """
        if self.settings.orth_reg_weight == 0:
            return
        factors = [weight for _, weight in self.factors]
        with torch.enable_grad():
            regularizer = orthogonal_regularizer(self.factors)
            grads = torch.autograd.grad(self.settings.orth_reg_weight * regularizer, factors)
        for parameter, grad in zip(factors, grads, strict=True):
            parameter.grad = grad if parameter.grad is None else parameter.grad.add_(grad)

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> HistoryRow | None:
        """PEFT's three phases: score and mask on the budget schedule, fix the final mask, then keep re-applying it."""
        final_start = self.config.total_step - self.config.tfinal
        model = self.tuner.model
        if step < final_start:
            budget, masks = self.allocator.update_and_allocate(model, step)
        elif step == final_start:
            budget, masks = self.allocator.update_and_allocate(model, step, force_mask=True)
            self.allocator.reset_ipt()
        else:
            if self.masks is not None:
                self.allocator.mask_using_rank_pattern(model, self.masks)
            return None
        if masks is None:
            return None
        self.masks = masks
        return HistoryRow(step, self.summary(), {"budget": budget})

    def ranks(self) -> dict[str, int]:
        """Each module's rank under the latest mask (init_r before the first)."""
        if self.masks is None:
            return {name: int(layer.r[ADAPTER]) for name, layer in self.layers.items()}
        return {name: sum(self.masks[f"{name}.lora_E.{ADAPTER}"]) for name in self.layers}

    def synchronize_gradients(self) -> None:
        """Nothing of its own: its tensors' gradients are averaged with the adapter's."""

    def closing_note(self) -> str | None:
        return None

    def totals(self) -> Totals:
        ranks = self.ranks()
        return Totals(
            sum(ranks.values()), sum(rank * _component_cost(self.layers[name]) for name, rank in ranks.items())
        )

    def summary(self) -> RankSnapshot:
        """Per-module rank and statistics of |E| (AdaLoRA's singular values, its gates) over the kept components."""
        modules = {}
        for name, rank in self.ranks().items():
            values = self.layers[name].lora_E[ADAPTER].detach().abs().flatten()  # (init_r,)
            if self.masks is not None:
                values = values[torch.tensor(self.masks[f"{name}.lora_E.{ADAPTER}"], device=values.device)]
            stats: dict[str, Any] = {"rank": rank}
            if rank:
                stats.update(gate_min=float(values.min()), gate_mean=float(values.mean()), gate_max=float(values.max()))
            modules[name] = stats
        return RankSnapshot(self.totals(), modules)

    @torch.no_grad()
    def folded_factors(self) -> FoldedFactors:
        """Components with E ≠ 0: A' = (A · E)[kept] (k, in), B' = B[:, kept] · alpha / (ranknum + 1e-5) (out, k)."""
        factors: FoldedFactors = {}
        for name, layer in self.layers.items():
            lora_a, lora_e, lora_b = layer.lora_A[ADAPTER], layer.lora_E[ADAPTER], layer.lora_B[ADAPTER]
            kept = lora_e.flatten().nonzero().flatten()  # (k,)
            if kept.numel() == 0:
                factors[name] = None
                continue
            scale = layer.scaling[ADAPTER] / (float(layer.ranknum[ADAPTER]) + RANKNUM_EPSILON)
            folded_a = (lora_a.float() * lora_e.float())[kept]  # (k, in)
            folded_b = lora_b.float()[:, kept] * scale  # (out, k)
            factors[name] = (folded_a.to(lora_a.dtype).contiguous(), folded_b.to(lora_b.dtype).contiguous())
        return factors

    def state_dict(self) -> dict[str, Any]:
        """The allocator's importance averages and the current masks (the weights travel in the checkpoint)."""
        return {
            "masks": self.masks,
            "ipt": self.allocator.ipt,
            "exp_avg_ipt": self.allocator.exp_avg_ipt,
            "exp_avg_unc": self.allocator.exp_avg_unc,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the state, moving the importance tensors to their parameters' devices (saved by process 0)."""
        devices = {name: p.device for name, p in self.tuner.model.named_parameters()}
        self.masks = state["masks"]
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(self.allocator, key, {name: t.to(devices[name]) for name, t in state[key].items()})


def _component_cost(layer: AdaLoraLayer) -> int:
    """Trainable parameters of one AdaLoRA component: a row of A, an entry of E, a column of B."""
    return int(layer.lora_A[ADAPTER].shape[1] + 1 + layer.lora_B[ADAPTER].shape[0])
