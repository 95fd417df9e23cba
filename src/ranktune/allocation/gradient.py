"""The gradient method's computation: the base weights' gradient, ranks from its spectrum under a parameter budget,
and A from its top right singular vectors.

The candidate modules are found by attaching the `lora` section's pool with PEFT (so `target_modules` means exactly
what it means in training) and unloading it after the gradient is taken: with B = 0 the pool adds nothing to the
forward pass, so the gradient of each base weight is the full fine-tuning gradient at step 0.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from ranktune.adapters.lora import attach_peft, build_lora_config, lora_layers
from ranktune.allocation.methods.gradient import GradientSettings
from ranktune.allocation.registry import BuildContext
from ranktune.allocation.saliency import Batch, summed_gradients
from ranktune.config import RunConfig
from ranktune.errors import UserInputError

# PEFT's default A (kaiming_uniform with a = √5) has entries U(-1/√in, 1/√in): each row's expected squared norm is 1/3.
DEFAULT_ROW_NORM = 1 / math.sqrt(3)


def _weight_gradient(layer: LoraLayer) -> torch.Tensor:
    """The base weight's .grad as (out, in) float32; GPT-2's Conv1D stores its weight as (in, out)."""
    grad = layer.get_base_layer().weight.grad.float()
    return grad.T if layer.fan_in_fan_out else grad


def _batch_count(batches: int, device: torch.device) -> int:
    """The number of batches over every process."""
    if not (dist.is_available() and dist.is_initialized()):
        return batches
    count = torch.tensor([float(batches)], device=device)
    dist.all_reduce(count)
    return int(count.item())


def full_gradients(model: PeftModel, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """The mean over every process's batches (`batches`: this process's) of ∂loss/∂W for each adapted module's base
    weight W: (out, in) float32.

    Runs in eval mode (no dropout), so every process and a resumed run compute the same gradient.
    """
    layers = lora_layers(model)
    was_training = model.training
    model.eval()
    frozen = {name: param.requires_grad for name, param in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    weights = [layer.get_base_layer().weight for layer in layers.values()]
    for weight in weights:
        weight.requires_grad_(True)
    try:
        summed_gradients(model, weights, [(batch, 1.0) for batch in batches])  # before FSDP wraps the model
        count = _batch_count(len(batches), weights[0].device)
        return {name: _weight_gradient(layer) / count for name, layer in layers.items()}
    finally:
        for weight in weights:
            weight.grad = None
        for name, param in model.named_parameters():
            param.requires_grad_(frozen[name])
        model.train(was_training)


def allocate_ranks(
    spectra: dict[str, torch.Tensor], costs: dict[str, int], budget: int, max_ranks: dict[str, int]
) -> dict[str, int]:
    """Ranks that spend at most `budget` parameters: every module starts at rank 1, then the next component with the
    largest σ² per parameter (σ from `spectra`, descending; a rank of module m costs `costs[m]`) is added while it
    fits, up to `max_ranks[m]`. Ties go to the module name that sorts first, so the choice is reproducible."""
    ranks = dict.fromkeys(spectra, 1)
    left = budget - sum(costs.values())
    if left < 0:
        raise UserInputError(f"the parameter budget ({budget}) is below rank 1 on every target ({budget - left})")
    heap = [(-float(spectra[name][1] ** 2) / costs[name], name) for name in sorted(spectra) if max_ranks[name] > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if costs[name] > left:
            continue  # this module's next rank does not fit; cheaper modules may still
        ranks[name] += 1
        left -= costs[name]
        if ranks[name] < max_ranks[name]:
            heapq.heappush(heap, (-float(spectra[name][ranks[name]] ** 2) / costs[name], name))
    return ranks


def attach_gradient_lora(
    model: PreTrainedModel,
    config: RunConfig,
    settings: GradientSettings,
    batches: Sequence[Batch],
    gradient_checkpointing: bool = False,
    learning_rate: float | None = None,
) -> PeftModel:
    """LoRA on the `lora` section's targets at the ranks the gradient gives, each module keeping the scale
    alpha / r of the section, A from the gradient (`init: gradient` or `step`) or PEFT's default, B = 0 but with
    `init: step` (then B starts as `init_steps` Adam-sized steps down B's own gradient, sized by `learning_rate`).

    Raises:
        UserInputError: a quantized base (its weights have no gradient to take).
    """
    if settings.init == "step" and learning_rate is None:
        raise ValueError("init 'step' sizes the start by the learning rate: pass learning_rate")
    if getattr(model, "is_quantized", False):
        raise UserInputError("allocation.method 'gradient' needs the base weights' gradient: use an unquantized base")
    lora = config.lora
    pool = attach_peft(model, build_lora_config(lora, config.model.task))
    gradients = full_gradients(pool, batches)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in lora_layers(pool).items()}
    model = pool.unload()

    costs = {name: out + inp for name, (out, inp) in shapes.items()}
    max_ranks = {name: max(1, min(math.floor(settings.rho * lora.r), *shapes[name])) for name in shapes}
    spectra: dict[str, torch.Tensor] = {}
    directions: dict[str, torch.Tensor] = {}  # the top right singular vectors each module may use: (max rank, in)
    outputs: dict[str, torch.Tensor] = {}  # with init 'step', the top left ones times σ: (out, max rank)
    for name in list(gradients):
        u, singular_values, vt = torch.linalg.svd(gradients.pop(name), full_matrices=False)
        spectra[name], directions[name] = singular_values, vt[: max_ranks[name]].clone()
        if settings.init == "step":
            outputs[name] = (u[:, : max_ranks[name]] * singular_values[: max_ranks[name]]).clone()
    if settings.rho == 1.0:
        ranks = {name: min(lora.r, max_ranks[name]) for name in shapes}
    else:
        ranks = allocate_ranks(spectra, costs, lora.r * sum(costs.values()), max_ranks)

    scale = lora.alpha / lora.r
    chosen = lora.model_copy(
        update={
            "target_modules": sorted(ranks),
            "exclude_modules": None,
            "rank_pattern": {name: rank for name, rank in ranks.items() if rank != lora.r},
            "alpha_pattern": {name: scale * rank for name, rank in ranks.items() if rank != lora.r},
        }
    )
    peft_model = attach_peft(model, build_lora_config(chosen, config.model.task), gradient_checkpointing)
    if settings.init == "lora":
        return peft_model
    adapter = peft_model.active_adapter
    with torch.no_grad():
        for name, layer in lora_layers(peft_model).items():
            lora_a = layer.lora_A[adapter].weight  # (k, in)
            rank = lora_a.shape[0]
            lora_a.copy_(directions[name][:rank] * DEFAULT_ROW_NORM)
            if settings.init == "step":
                lora_b = layer.lora_B[adapter].weight  # (out, k)
                lora_b.copy_(_step_start(outputs[name][:, :rank], learning_rate * settings.init_steps))
    return peft_model


def _step_start(left: torch.Tensor, size: float) -> torch.Tensor:
    """B after `size` / lr Adam-like steps of size lr down B's gradient, taken at once: with A = V_kᵀ / √3, B's
    gradient scale · G · Aᵀ is proportional to U_k Σ_k (`left`, (out, k)), and an Adam step moves each entry by about
    the learning rate, so B = -U_k Σ_k scaled to an RMS entry of `size`. Then scale · B · A = -γ G_k for some γ > 0,
    G_k the best rank-k approximation of G. A zero gradient gives B = 0."""
    rms = float(left.pow(2).mean().sqrt())
    if rms == 0.0:
        return torch.zeros_like(left)
    return left * (-size / rms)  # (out, k)


def build_gradient_lora(
    model: PreTrainedModel, config: RunConfig, settings: GradientSettings, context: BuildContext
) -> PeftModel:
    """`attach_gradient_lora` on the first `settings.batches` training batches of the global batch size, moved to
    the device training will use (the backward passes and SVDs run there), at the run's learning rate.

    The batches are shared out whole among the processes: the rows are the same whatever the number of processes,
    and the gradients summed across them give every process the same decision.
    """
    rows = context.args.per_device_train_batch_size * context.args.world_size
    batches = context.calibration_batches(settings.batches, batch_size=rows, shard=True)
    model = model.to(context.args.device)
    gradient_checkpointing, learning_rate = context.gradient_checkpointing, context.args.learning_rate
    return attach_gradient_lora(model, config, settings, batches, gradient_checkpointing, learning_rate)
