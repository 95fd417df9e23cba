"""The gradient method: ranks from the gradient's spectrum under a parameter budget, A from its top right singular
vectors, checked against values computed by hand and a gradient taken here without PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ranktune.adapters.lora import lora_layers
from ranktune.allocation.gradient import DEFAULT_ROW_NORM, allocate_ranks, attach_gradient_lora
from ranktune.config import validate_config
from ranktune.errors import UserInputError
from tests.conftest import save_tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def gradient_run(tmp_path, r: int = 4, **allocation):
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    config = validate_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "unused.jsonl"},
            "lora": {"r": r, "alpha": 2 * r, "target_modules": TARGETS},
            "allocation": {"method": "gradient", **allocation},
        }
    )
    torch.manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(10, 90, (4, 12))  # (B, T)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model_dir, config, batches


def test_allocation_by_hand():
    """Budget 60 with costs a: 10, b: 20. Rank 1 each spends 30; then per parameter σ²/cost: a's 2nd component
    9/10 = 0.9, b's 2nd 16/20 = 0.8, a's 3rd 4/10 = 0.4, b's 3rd 1/20 = 0.05. a:2 (40), b:2 (60): budget spent."""
    spectra = {"a": torch.tensor([5.0, 3.0, 2.0]), "b": torch.tensor([6.0, 4.0, 1.0])}
    ranks = allocate_ranks(spectra, {"a": 10, "b": 20}, budget=60, max_ranks={"a": 3, "b": 3})
    assert ranks == {"a": 2, "b": 2}
    # With 15 left after a's 2nd, b's 2nd (20) no longer fits but a's 3rd (10) does.
    ranks = allocate_ranks(spectra, {"a": 10, "b": 20}, budget=55, max_ranks={"a": 3, "b": 3})
    assert ranks == {"a": 3, "b": 1}
    # The cap stops a module even when its components are the most valuable.
    ranks = allocate_ranks(spectra, {"a": 10, "b": 20}, budget=80, max_ranks={"a": 2, "b": 3})
    assert ranks == {"a": 2, "b": 3}
    with pytest.raises(UserInputError, match="below rank 1 on every target"):
        allocate_ranks(spectra, {"a": 10, "b": 20}, budget=20, max_ranks={"a": 3, "b": 3})


def hand_gradient(model_dir, batches, name: str) -> torch.Tensor:
    """The mean gradient of the loss over the batches for one base weight, with plain autograd and no PEFT."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    weight = model.get_submodule(name).weight
    total = torch.zeros_like(weight)
    for batch in batches:
        (grad,) = torch.autograd.grad(model(**batch).loss, weight)
        total += grad
    return total / len(batches)


def test_a_is_the_gradients_top_right_singular_vectors_and_b_is_zero(tmp_path):
    model_dir, config, batches = gradient_run(tmp_path, rho=2.0)
    model = attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = lora_layers(model)[name]
        lora_a = layer.lora_A["default"].weight.detach()  # (r, in)
        _, _, vt = torch.linalg.svd(hand_gradient(model_dir, batches, name), full_matrices=False)
        alignment = torch.linalg.svdvals(torch.nn.functional.normalize(lora_a, dim=1) @ vt[: lora_a.shape[0]].T)
        assert alignment.min() > 0.999, (name, alignment)  # cosines of the angles between the two subspaces
        torch.testing.assert_close(lora_a.norm(dim=1), torch.full((lora_a.shape[0],), DEFAULT_ROW_NORM))
        assert layer.lora_B["default"].weight.abs().sum() == 0  # training starts from the base model
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha / r of the section, whatever the rank


def test_ranks_spend_the_parameter_budget_of_uniform_lora(tmp_path):
    model_dir, config, batches = gradient_run(tmp_path, rho=2.0)
    model = attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)
    layers = lora_layers(model)
    assert len(layers) == 6  # q, v and down in two layers
    costs = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
    ranks = {name: layer.r["default"] for name, layer in layers.items()}
    budget = 4 * sum(costs.values())
    spent = sum(ranks[name] * costs[name] for name in ranks)
    assert budget - min(costs.values()) < spent <= budget  # nothing left that would still fit
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 8


def test_rho_one_keeps_uniform_ranks_and_init_lora_keeps_peft_init(tmp_path):
    model_dir, config, batches = gradient_run(tmp_path, rho=1.0)
    model = attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)
    assert {layer.r["default"] for layer in lora_layers(model).values()} == {4}

    model_dir, config, batches = gradient_run(tmp_path, rho=2.0, init="lora")
    model = attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    lora_a = layer.lora_A["default"].weight.detach()
    bound = 1 / math.sqrt(layer.in_features)  # PEFT's kaiming-uniform A lies within ±1/√in, unlike unit-norm rows
    assert lora_a.abs().max() <= bound
    _, _, vt = torch.linalg.svd(hand_gradient(model_dir, batches, "model.layers.0.self_attn.q_proj"))
    alignment = torch.linalg.svdvals(torch.nn.functional.normalize(lora_a, dim=1) @ vt[: lora_a.shape[0]].T)
    assert alignment.min() < 0.9


def test_step_init_starts_the_adapter_as_a_sized_step_down_the_gradient(tmp_path):
    """scale · B · A = -γ G_k for some γ > 0, G_k the best rank-k approximation of the hand gradient (k the
    module's rank), with B's RMS entry init_steps × learning rate."""
    model_dir, config, batches = gradient_run(tmp_path, rho=2.0, init="step", init_steps=5.0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = attach_gradient_lora(base, config, config.allocation, batches, learning_rate=1e-3)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = lora_layers(model)[name]
        lora_a, lora_b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert lora_b.pow(2).mean().sqrt().item() == pytest.approx(5e-3, rel=1e-4)
        start = layer.scaling["default"] * lora_b @ lora_a  # (out, in)
        u, sigma, vt = torch.linalg.svd(hand_gradient(model_dir, batches, name), full_matrices=False)
        k = lora_a.shape[0]
        best = u[:, :k] * sigma[:k] @ vt[:k]  # G_k
        gamma = -(start * best).sum() / best.pow(2).sum()  # the least-squares γ of start ≈ -γ G_k
        assert gamma > 0
        torch.testing.assert_close(start, -gamma * best, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="pass learning_rate"):
        attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)


def test_gpt2_conv1d_gradient_is_read_as_out_by_in(tmp_path):
    """GPT-2's Conv1D stores its weight as (in, out): the gradient must be transposed before its SVD. c_proj is
    square, so a missing transpose would keep the shapes and give A the left singular vectors instead."""
    model_dir = save_tiny_model(tmp_path / "gpt2", "gpt2")
    config = validate_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "unused.jsonl"},
            "lora": {"r": 2, "target_modules": ["attn.c_proj"]},
            "allocation": {"method": "gradient", "rho": 1.0},
        }
    )
    torch.manual_seed(1)
    ids = torch.randint(10, 90, (4, 12))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    model = attach_gradient_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, batches)
    name = "transformer.h.0.attn.c_proj"
    lora_a = lora_layers(model)[name].lora_A["default"].weight.detach()  # (r, in)
    conv_grad = hand_gradient(model_dir, batches, name)  # Conv1D: (in, out)
    _, _, vt = torch.linalg.svd(conv_grad.T, full_matrices=False)  # of the (out, in) gradient
    alignment = torch.linalg.svdvals(torch.nn.functional.normalize(lora_a, dim=1) @ vt[:2].T)
    assert alignment.min() > 0.999, alignment


def test_l1ra_started_from_the_gradient_begins_with_its_ranks_and_factors(tmp_path):
    """One step of each at a negligible learning rate, no rank update yet: the L1RA run's ranks are the gradient
    run's and its A rows point the same way (L1RA's exported A has each row scaled by its gate, which took a step)."""
    from safetensors.torch import load_file

    from ranktune.training import train
    from tests.training.test_run import text_config

    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    starts, tensors = {}, {}
    for name, allocation in {
        "gradient": {"method": "gradient", "rho": 2.0, "batches": 2},
        "l1ra": {"method": "l1ra", "budget": "params", "start": {"method": "gradient", "rho": 2.0, "batches": 2}},
    }.items():
        (tmp_path / name).mkdir()
        config = text_config(model_dir, tmp_path / name, max_steps=1, learning_rate=1e-9)
        config["lora"] = {"r": 4, "alpha": 8, "target_modules": TARGETS}
        config["allocation"] = allocation
        result = train(validate_config(config))
        starts[name] = {module["module"]: module["rank"] for module in result.info["modules"]}
        tensors[name] = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert starts["l1ra"] == starts["gradient"]
    assert len(set(starts["gradient"].values())) > 1  # the gradient did move ranks: the comparison means something
    keys = [key for key in tensors["gradient"] if "lora_A" in key]
    assert sorted(keys) == sorted(key for key in tensors["l1ra"] if "lora_A" in key) and len(keys) == 6
    for key in keys:
        want = torch.nn.functional.normalize(tensors["gradient"][key], dim=1)  # (r, in)
        got = torch.nn.functional.normalize(tensors["l1ra"][key], dim=1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("lora", "allocation", "message"),
    [
        ({"r": 4}, {"max_rank": 6, "start": {"rho": 2.0}}, "allocation.start.rho (2.0) lets a module start above"),
        ({"r": 4, "rank_pattern": {"q_proj": 2}}, {"start": {}}, "remove lora.rank_pattern"),
        ({"r": 4, "rslora": True}, {"start": {}}, "remove lora.rslora"),
    ],
)
def test_l1ra_start_refuses_what_the_gradient_would_override(lora, allocation, message):
    start = {"method": "gradient", **allocation.pop("start")}
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load = {
            "model": {"name_or_path": "tiny"},
            "data": {"train": "train.jsonl"},
            "lora": lora,
            "allocation": {"method": "l1ra", **allocation, "start": start},
        }
        validate_config(load)
