"""Zero-cost saliency proxies that score HeteroLoRA's candidates (higher = more important): LoRA modules and
shortcut connections (`adapters/shortcuts.py`), each a low-rank pair A (r, in), B (out, r).

All heuristics see the batches they are given: the first N in dataset order for `ranktune saliency`, a fresh
seeded draw at each of the dynamic search's reallocations. Under torch.distributed each process takes every
world_size-th batch and gradient sums are all-reduced before scoring, so every process computes the same scores.

- constant: 1 for every module (selection is then the seeded tie-break: the random baseline).
- grad_norm: ||∂L/∂A||_F + ||∂L/∂B||_F, L the mean loss over the batches (so the score does not depend on how
  the same rows are cut into batches or shared out among processes).
- snip: Σ|A ⊙ ∂L/∂A| + Σ|B ⊙ ∂L/∂B|, L as for grad_norm.
- synflow: every parameter replaced by its absolute value, an all-ones input embedding, R = the sum of the outputs;
  score Σ|A ⊙ ∂R/∂A| + Σ|B ⊙ ∂R/∂B|. A freshly initialised LoRA has B = 0, which makes every such score exactly 0
  (the reference logs 1e-26…1e-30); ranktune scores an all-zero B as if it held the constant 1/r, so the score
  measures how much of the network's signal flows through the module's low-rank path.
- alpha_test: per module, the smallest scale α in {0, 0.1, …, 1} of the module's output that keeps the loss within
  `tolerance` (relative) of the unscaled model's, found by binary search; score = α. For a LoRA module α scales the
  whole projection (base + LoRA); for a shortcut connection only its low-rank term (its base, identity or zero,
  stays).

At initialisation (B = 0) ∂L/∂A = 0, so grad_norm is driven by B alone and snip is exactly 0 for every module: a
plan from it would be the seeded random one, so snip is refused while every B is 0. It is informative once B has
trained (the dynamic search's online scoring).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from peft.tuners.lora import LoraLayer
from torch import nn

from ranktune.adapters.shortcuts import find_shortcuts
from ranktune.allocation.methods.hetero import HEURISTICS
from ranktune.errors import UserInputError

ADAPTER = "default"
ALPHAS = tuple(i / 10 for i in range(11))

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Candidate:
    """One scored unit: its low-rank factors and the module whose output alpha_test scales."""

    lora_a: torch.Tensor  # (r, in)
    lora_b: torch.Tensor  # (out, r)
    output: nn.Module

    @property
    def in_features(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of a PeftModel, keyed by its module name in the base model."""
    return {
        name.removeprefix("base_model.model."): layer
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
    }


def candidates(model: nn.Module) -> dict[str, Candidate]:
    """Every LoRA module, then every shortcut connection of the model, keyed by name in the base model."""
    found = {
        name: Candidate(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer)
        for name, layer in lora_layers(model).items()
    }
    shortcuts = find_shortcuts(model)
    if shortcuts is not None:
        for name, connection in shortcuts.named_connections():
            found[name] = Candidate(connection.A, connection.B, connection)
    return found


def _factors(layer: Candidate) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_a, layer.lora_b


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _my_batches(batches: Sequence[Batch]) -> list[tuple[Batch, float]]:
    """This process's share of the batches, each with its weight: every world_size-th batch (weight 1), padded with
    weight-0 passes so that every process runs the same number of forward and backward passes. Under FSDP each
    pass is collective (the base weights are all-gathered), so uneven counts would leave processes waiting."""
    batches = list(batches)
    if not _distributed():
        return [(batch, 1.0) for batch in batches]
    world = dist.get_world_size()
    mine = [(batch, 1.0) for batch in batches[dist.get_rank() :: world]]
    passes = -(-len(batches) // world)  # ceil
    return mine + [(batches[0], 0.0)] * (passes - len(mine))


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def summed_gradients(
    model: nn.Module, parameters: Sequence[torch.Tensor], batches: Sequence[tuple[Batch, float]]
) -> None:
    """Leaves Σ_b ∂L_b/∂p over every process's batches in each parameter's .grad (zeros where no batch reached it,
    including on a process that got no batch: the sum across processes still takes place).

    `batches` are this process's own, with their weights (`_my_batches`); the parameters must require grad.
    """
    device = parameters[0].device
    for weight in parameters:
        weight.grad = None
    with torch.enable_grad():
        for batch, weight in batches:
            (model(**_to(batch, device)).loss * weight).backward()
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in parameters]
    if _distributed():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
    for weight, grad in zip(parameters, grads, strict=True):
        weight.grad = grad


def gradient_score(lora_a: torch.Tensor, lora_b: torch.Tensor, snip: bool) -> torch.Tensor:
    """grad_norm (||dL/dA|| + ||dL/dB||) or snip (Σ|A ⊙ dL/dA| + Σ|B ⊙ dL/dB|) from the factors' current .grad."""
    if snip:
        return (lora_a * lora_a.grad).abs().sum() + (lora_b * lora_b.grad).abs().sum()
    return lora_a.grad.norm() + lora_b.grad.norm()


def _gradient_scores(model: nn.Module, layers: dict[str, Candidate], batches: Sequence[Batch], snip: bool):
    summed_gradients(model, [w for layer in layers.values() for w in _factors(layer)], _my_batches(batches))
    scores = {}
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = _factors(layer)
            scores[name] = float(gradient_score(lora_a, lora_b, snip)) / len(batches)  # of the mean gradient
            lora_a.grad = lora_b.grad = None
    return scores


def probe_directions(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """A fresh lora_A for the candidate `name`: PEFT's kaiming-uniform init (a = √5, entries within ±1/√in), drawn
    from a generator seeded by (seed, name), so every process and every reallocation gets the same one.
    Shape (rank, in_features)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def fresh_gradient_scores(model: nn.Module, batches: Sequence[Batch], seed: int) -> dict[str, float]:
    """grad_norm of every candidate as a freshly initialised module would score at the model as it is now.

    A fresh module has B = 0, so ∂L/∂A = 0 and its grad_norm is ||∂L/∂B|| = scale · ||G A₀ᵀ||, with G = Σ ∂L/∂y xᵀ
    the gradient of the mean loss over the batches with respect to the module's whole weight and A₀ a fresh A
    (`probe_directions`). Each candidate gets a probe: a zero (out, r) tensor Z added through a forward hook as
    scale · (x A₀ᵀ) Zᵀ, which adds nothing to the output and whose gradient is exactly that ∂L/∂B. The candidate's
    own factors, trained or not, switched on or not, take no part in its score: enabled and disabled candidates
    compete on the same terms.
    """
    layers = candidates(model)
    probes: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # name: (A₀ (r, in), Z (out, r), scale)
    handles = []

    def hook_for(name: str) -> Callable:
        def add_probe(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            directions, zero, scale = probes[name]
            x = args[0].to(directions.dtype)  # (..., in)
            return output + ((x @ directions.T) @ zero.T * scale).to(output.dtype)  # (..., out)

        return add_probe

    for name, layer in layers.items():
        rank, device = layer.lora_a.shape[0], layer.lora_a.device
        directions = probe_directions(name, rank, layer.in_features, seed).to(device, layer.lora_a.dtype)
        zero = torch.zeros(layer.out_features, rank, device=device, dtype=layer.lora_a.dtype, requires_grad=True)
        probes[name] = (directions, zero, _scale(layer.output))
        handles.append(layer.output.register_forward_hook(hook_for(name)))
    try:
        zeros = [zero for _, zero, _ in probes.values()]
        summed_gradients(model, zeros, _my_batches(batches))
        return {name: float(zero.grad.norm()) / len(batches) for name, (_, zero, _) in probes.items()}
    finally:
        for handle in handles:
            handle.remove()


def _scale(module: nn.Module) -> float:
    """The LoRA scale of a candidate's module: PEFT's per-adapter scaling or a shortcut connection's own."""
    scaling = module.scaling
    return float(scaling[ADAPTER] if isinstance(scaling, dict) else scaling)


def _synflow(model: nn.Module, layers: dict[str, Candidate], batches: Sequence[Batch]) -> dict[str, float]:
    """SynFlow on one all-ones input shaped like the first batch; parameters are restored exactly afterwards."""
    first = batches[0]
    length = int(first["input_ids"].shape[1])
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings()
    negative = {name: p.detach() < 0 for name, p in model.named_parameters()}
    zero_b = [layer for layer in layers.values() if not _factors(layer)[1].any()]
    try:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.abs_()
            for layer in zero_b:
                lora_b = _factors(layer)[1]
                lora_b.fill_(1.0 / lora_b.shape[1])
        ones = torch.ones(1, length, embeddings.embedding_dim, device=device, dtype=embeddings.weight.dtype)
        factors = [w for layer in layers.values() for w in _factors(layer)]
        with torch.enable_grad():
            output = model(inputs_embeds=ones)
            total = output.logits.float().sum()
            grads = torch.autograd.grad(total, factors)
        scores = {}
        with torch.no_grad():
            for index, name in enumerate(layers):
                lora_a, lora_b = _factors(layers[name])
                grad_a, grad_b = grads[2 * index], grads[2 * index + 1]
                scores[name] = float((lora_a * grad_a).abs().sum() + (lora_b * grad_b).abs().sum())
    finally:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(torch.where(negative[name], -parameter.abs(), parameter.abs()))
            for layer in zero_b:
                _factors(layer)[1].zero_()
    return scores


def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """The mean loss over the batches, summed across processes."""
    device = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, batch count)
    with torch.no_grad():
        for batch, weight in _my_batches(batches):
            total[0] += float(model(**_to(batch, device)).loss) * weight
            total[1] += weight
    if _distributed():
        dist.all_reduce(total)
    return float(total[0] / total[1])


def _alpha_test(
    model: nn.Module, layers: dict[str, Candidate], batches: Sequence[Batch], tolerance: float
) -> dict[str, float]:
    """Binary search per module for the smallest output scale that keeps the loss within tolerance."""
    reference = mean_loss(model, batches)
    scores = {}
    scale = {"alpha": 1.0}

    def scaled(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * scale["alpha"]

    for name, layer in layers.items():
        hook = layer.output.register_forward_hook(scaled)
        try:
            low, high = 0, len(ALPHAS) - 1  # ALPHAS[high] always passes (α = 1 is the reference)
            while low < high:
                middle = (low + high) // 2
                scale["alpha"] = ALPHAS[middle]
                if mean_loss(model, batches) <= reference * (1 + tolerance):
                    high = middle
                else:
                    low = middle + 1
            scores[name] = ALPHAS[high]
        finally:
            hook.remove()
    return scores


def score_modules(
    model: nn.Module,
    batches: Sequence[Batch],
    heuristic: str,
    tolerance: float = 0.01,
    fresh_seed: int | None = None,
) -> dict[str, float]:
    """Scores every candidate of `model` (LoRA modules, shortcut connections) with one heuristic over `batches`.

    Leaves no gradient behind on any parameter, so it can run before training or between optimizer steps.

    Args:
        model: a PeftModel with every candidate enabled (with `fresh_seed`: as it is).
        batches: collated batches with labels, the same list on every process.
        heuristic: one of HEURISTICS.
        tolerance: alpha_test's relative loss tolerance.
        fresh_seed: with grad_norm, score every candidate as a fresh module would score
            (`fresh_gradient_scores`, its probe directions seeded by this).

    Returns:
        {module name in the base model: score}.

    Raises:
        UserInputError: snip while every candidate's B is 0 (it scores them all 0).
    """
    layers = candidates(model)
    was_training = model.training
    model.eval()  # no dropout: the same batches give the same scores
    try:
        if heuristic == "constant":
            return dict.fromkeys(layers, 1.0)
        if heuristic == "snip" and not any(_factors(layer)[1].any() for layer in layers.values()):
            raise UserInputError(
                "heuristic snip: every candidate's B is 0 (a freshly initialised LoRA), so |A ⊙ dL/dA| + "
                "|B ⊙ dL/dB| is exactly 0 for all of them and a plan from it would be a random one; score before "
                "training with grad_norm, synflow or alpha_test"
            )
        if heuristic == "grad_norm" and fresh_seed is not None:
            return fresh_gradient_scores(model, batches, fresh_seed)
        if heuristic in ("grad_norm", "snip"):
            return _gradient_scores(model, layers, batches, snip=heuristic == "snip")
        if heuristic == "synflow":
            return _synflow(model, layers, batches)
        if heuristic == "alpha_test":
            return _alpha_test(model, layers, batches, tolerance)
        raise ValueError(f"unknown heuristic '{heuristic}'; expected one of {', '.join(HEURISTICS)}")
    finally:
        model.train(was_training)
        for parameter in model.parameters():
            parameter.grad = None


def first_batches(dataset: Iterable[dict[str, Any]], collator: Callable, batch_size: int, count: int) -> list[Batch]:
    """The first `count` batches of `dataset` in order (no shuffling), collated."""
    rows = []
    batches = []
    for row in dataset:
        rows.append(row)
        if len(rows) == batch_size:
            batches.append(collator(rows))
            rows = []
            if len(batches) == count:
                return batches
    if rows and len(batches) < count:
        batches.append(collator(rows))
    return batches
