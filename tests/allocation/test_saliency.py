"""Saliency heuristics against values computed by hand or by an independent autograd pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from ranktune.allocation.saliency import score_modules
from ranktune.errors import UserInputError


class TwoProjections(nn.Module):
    """logits = p1(x) + p2(x) on input embeddings; MSE loss against `labels`. Small enough to score by hand."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, width)
        self.p1 = nn.Linear(width, width, bias=False)
        self.p2 = nn.Linear(width, width, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, inputs_embeds: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.p1(inputs_embeds) + self.p2(inputs_embeds)  # (B, T, width)
        loss = None if labels is None else ((logits - labels) ** 2).mean()
        return SimpleNamespace(logits=logits, loss=loss)


def toy(rank: int = 2, alpha: int = 4):
    torch.manual_seed(0)
    return get_peft_model(TwoProjections(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["p1", "p2"]))


def llama_with_trained_b(make_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)  # as after some training: B = 0 would zero every gradient of A
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(7, 60, (2, 10), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def by_autograd(model, batches):
    total = sum(model(**batch).loss for batch in batches) / len(batches)  # the mean loss over the batches
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    layers = {n: m for n, m in layers.items() if "default" in getattr(m, "lora_A", {})}
    weights = [w for m in layers.values() for w in (m.lora_A["default"].weight, m.lora_B["default"].weight)]
    grads = torch.autograd.grad(total, weights)
    return layers, dict(zip(weights, grads, strict=True))


@pytest.mark.parametrize("heuristic", ["grad_norm", "snip"])
def test_gradient_heuristics_match_an_independent_autograd_pass(heuristic, make_model_dir):
    model, batches = llama_with_trained_b(make_model_dir)
    model.eval()
    layers, grads = by_autograd(model, batches)
    scores = score_modules(model, batches, heuristic)
    assert set(scores) == set(layers) and len(scores) == 4
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if heuristic == "grad_norm":
            expected = grads[a].norm() + grads[b].norm()
        else:
            expected = (a * grads[a]).abs().sum() + (b * grads[b]).abs().sum()
        assert scores[name] == pytest.approx(float(expected), rel=1e-5)
    assert len({round(s, 8) for s in scores.values()}) == 4


def test_constant_scores_every_module_one():
    assert score_modules(toy(), [], "constant") == {"p1": 1.0, "p2": 1.0}


def test_synflow_by_hand_is_informative_with_b_zero_and_restores_the_parameters():
    """With |W|, all-ones inputs of length T and R = Σ logits, each module scores
    Σ|A ⊙ ∂R/∂A| + Σ|B ⊙ ∂R/∂B| = 2 · T · s · Σ_k (Σ_o |B_ok|)(Σ_i |A_ki|); B = 0 is scored as B = 1/r."""
    model = toy(rank=2, alpha=4)  # scale s = 4 / 2
    with torch.no_grad():
        model.base_model.model.p1.weight.mul_(-1.0)  # negative weights must come back negative
        model.base_model.model.p2.lora_B["default"].weight.normal_()  # p2: a trained B
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = [{"input_ids": torch.zeros(1, 5, dtype=torch.long)}]  # only the length (T = 5) is used
    scores = score_modules(model, batches, "synflow")

    width, rank, scale, length = 6, 2, 2.0, 5
    for name in ("p1", "p2"):
        layer = getattr(model.base_model.model, name)
        a = layer.lora_A["default"].weight.abs()  # (r, in)
        b = layer.lora_B["default"].weight.abs()  # (out, r)
        if not b.any():
            b = torch.full((width, rank), 1.0 / rank)
        expected = 2 * length * scale * float((b.sum(dim=0) * a.sum(dim=1)).sum())
        assert scores[name] == pytest.approx(expected, rel=1e-5)
    assert scores["p1"] > 0
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_alpha_test_finds_the_smallest_scale_that_keeps_the_loss():
    """p2's base weight is zero, so scaling it changes nothing (score 0); the labels are exactly the unscaled output,
    so any scale of p1 below 1 raises the loss above the 1 % tolerance (score 1)."""
    model = toy()
    with torch.no_grad():
        model.base_model.model.p2.weight.zero_()
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = model(inputs_embeds=x).logits
    scores = score_modules(model, [{"inputs_embeds": x, "labels": target + 0.01}], "alpha_test")
    assert scores == {"p1": 1.0, "p2": 0.0}


def test_unknown_heuristic_is_named():
    with pytest.raises(ValueError, match="unknown heuristic 'fisher'; expected one of constant, grad_norm"):
        score_modules(toy(), [], "fisher")


def llama_with_trained_shortcuts(make_model_dir):
    from ranktune.adapters.shortcut_types import ShortcutSpec
    from ranktune.adapters.shortcuts import install_shortcuts

    model, batches = llama_with_trained_b(make_model_dir)
    shortcuts = install_shortcuts(
        model, {(0, "residual1"): ShortcutSpec(2, 4.0, 0.0), (1, "shortcut2"): ShortcutSpec(2, 4.0, 0.0)}
    )
    with torch.no_grad():
        for _, connection in shortcuts.named_connections():
            connection.B.normal_(std=0.1)
    return model, batches, dict(shortcuts.named_connections())


@pytest.mark.parametrize("heuristic", ["grad_norm", "snip"])
def test_shortcut_connections_are_scored_like_lora_modules(heuristic, make_model_dir):
    model, batches, connections = llama_with_trained_shortcuts(make_model_dir)
    scores = score_modules(model, batches, heuristic)
    assert set(connections) <= set(scores) and len(scores) == 4 + 2  # q, v in 2 layers + 2 connections
    total = sum(model(**batch).loss for batch in batches) / len(batches)  # the mean loss over the batches
    weights = [w for c in connections.values() for w in (c.A, c.B)]
    grads = dict(zip(["A0", "B0", "A1", "B1"], torch.autograd.grad(total, weights), strict=True))
    for index, (name, connection) in enumerate(connections.items()):
        grad_a, grad_b = grads[f"A{index}"], grads[f"B{index}"]
        if heuristic == "grad_norm":
            expected = grad_a.norm() + grad_b.norm()
        else:
            expected = (connection.A * grad_a).abs().sum() + (connection.B * grad_b).abs().sum()
        assert scores[name] == pytest.approx(float(expected), rel=1e-4)


def test_alpha_test_scales_only_the_low_rank_term_of_a_shortcut(make_model_dir):
    """A connection whose B is zero adds nothing at any scale, so its smallest passing scale is 0."""
    model, batches, connections = llama_with_trained_shortcuts(make_model_dir)
    with torch.no_grad():
        connections["model.layers.0.residual1"].B.zero_()
    scores = score_modules(model, batches, "alpha_test", tolerance=0.01)
    assert scores["model.layers.0.residual1"] == 0.0


def test_snip_is_refused_while_every_b_is_zero(make_model_dir):
    """A fresh pool scores 0 everywhere under SNIP (B = 0 and dL/dA = 0): a plan from it would be random."""
    model, batches = llama_with_trained_b(make_model_dir)
    layers, grads = by_autograd(model, batches)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["default"].weight.zero_()
    layers, grads = by_autograd(model, batches)  # the premise: SNIP is exactly 0 for every module
    assert all(float((w * g).abs().sum()) == 0.0 for w, g in grads.items())
    with pytest.raises(UserInputError, match="heuristic snip: every candidate's B is 0"):
        score_modules(model, batches, "snip")
    assert len(set(score_modules(model, batches, "grad_norm").values())) == 4  # grad_norm still tells them apart


def test_offline_snip_search_is_refused_in_the_config():
    from ranktune.config import validate_config

    base = {"model": {"name_or_path": "m"}, "data": {"train": "t"}}
    with pytest.raises(UserInputError, match="offline snip scores every module whose B has never trained"):
        validate_config({**base, "allocation": {"method": "hetero", "heuristic": "snip"}})
    assert validate_config({**base, "allocation": {"method": "hetero", "heuristic": "snip", "online": True}})
