"""EVA: each module's A is the top principal directions of its inputs, and the rank budget is redistributed, not
grown."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ranktune.allocation.eva import attach_eva_lora
from ranktune.allocation.methods.eva import EvaSettings
from ranktune.config import validate_config
from ranktune.errors import RuntimeFailure
from tests.conftest import save_tiny_model

TARGETS = ["q_proj", "v_proj", "down_proj"]


def eva_run(tmp_path, **allocation):
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    config = validate_config(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "unused.jsonl"},
            "lora": {"r": 4, "target_modules": TARGETS},
            "allocation": {"method": "eva", **allocation},
        }
    )
    torch.manual_seed(1)
    ids = torch.randint(10, 90, (16, 12))  # (B, T): 192 token rows per module, more than any module's components
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model_dir, config, batch


def module_inputs(model_dir, batch, name: str) -> torch.Tensor:
    """The inputs of one linear module of the bare model on a batch, one row per token: (B·T, d)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def test_a_is_the_top_principal_directions_of_the_module_inputs(tmp_path):
    """With one calibration batch PEFT's incremental PCA sees exactly that batch: its components must span the
    same space as the top right singular vectors of the centred inputs, computed here by hand."""
    model_dir, config, batch = eva_run(tmp_path, rho=2.0, tau=0.999)
    model = attach_eva_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, [batch])
    name = "model.layers.0.self_attn.q_proj"
    lora_a = model.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.detach()  # (k, d)
    inputs = module_inputs(model_dir, batch, name)  # (n, d)
    _, _, vt = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    expected = vt[: lora_a.shape[0]]  # (k, d)
    alignment = torch.linalg.svdvals(torch.nn.functional.normalize(lora_a, dim=1) @ expected.T)  # cosines of angles
    assert alignment.min() > 0.999, alignment


def test_ranks_are_redistributed_within_the_budget(tmp_path):
    model_dir, config, batch = eva_run(tmp_path, rho=2.0)
    model = attach_eva_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, [batch])
    ranks = {name: layer.r["default"] for name, layer in model.named_modules() if hasattr(layer, "lora_A") and layer.r}
    assert len(ranks) == 6  # q, v and down in two layers
    assert sum(ranks.values()) == 6 * 4 and max(ranks.values()) <= 8  # Σ r kept, each at most rho · r
    assert len(set(ranks.values())) > 1
    for layer in (m for m in model.modules() if hasattr(m, "lora_B") and m.r):
        assert layer.lora_B["default"].weight.abs().sum() == 0  # B starts at 0: training starts from the base model


def test_no_convergence_is_an_error_not_a_hang(tmp_path):
    """PEFT cycles over the batches until every component converges; a module with fewer rows per batch than
    components never does. The pass bound turns that into one clear error."""
    model_dir, config, batch = eva_run(tmp_path, rho=2.0, max_passes=2)
    tiny = {key: value[:1, :4] for key, value in batch.items()}  # 4 token rows per batch, 8 components wanted
    with pytest.raises(RuntimeFailure, match="EVA did not converge in 2 passes over 1 calibration batches"):
        attach_eva_lora(AutoModelForCausalLM.from_pretrained(model_dir), config, config.allocation, [tiny])


def test_settings_mirror_peft():
    from ranktune.allocation.eva import eva_config

    config = eva_config(EvaSettings(rho=1.5, tau=0.9, whiten=True, use_label_mask=False))
    assert (config.rho, config.tau, config.whiten, config.use_label_mask) == (1.5, 0.9, True, False)
