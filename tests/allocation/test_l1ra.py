"""The L1RA strategy on a tiny llama: proximal gate step by hand, invariants of a rank update, state that survives."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ranktune.allocation.components import install_gates
from ranktune.allocation.l1ra import L1RASettings, L1RAStrategy


@pytest.fixture
def gated(make_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    return model, install_gates(model, capacity=8)


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def test_installing_gates_keeps_the_function(make_model_dir):
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(make_model_dir("llama")), LoraConfig(r=4))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
        before = model(IDS).logits
        modules = install_gates(model, capacity=8)
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-6)
    assert {m.rank for m in modules} == {4} and {m.capacity for m in modules} == {8}
    # until training starts no gate requires grad, so an optimizer built from trainable parameters leaves them out
    assert [n for n, p in model.named_parameters() if "lora_gate" in n and p.requires_grad] == []


def test_proximal_step_by_hand(gated):
    _, modules = gated
    strategy = L1RAStrategy(modules, L1RASettings(l1ra_lambda=0.5, eta_c=0.1))
    gate = modules[0].lora_A.lora_gate
    with torch.no_grad():
        gate[:4] = torch.tensor([1.0, 0.4, 0.03, 0.2])
    for g in strategy.gates:
        g.grad = torch.zeros_like(g)
    gate.grad[:4] = torch.tensor([0.0, 0.0, 0.0, -5.0])
    strategy.gate_step()
    # Adam's first step moves each entry by lr * sign(grad) (0 where grad is 0): 0.2 -> 0.3 for the last one.
    # Then soft-threshold by eta_c * lambda = 0.05 and clamp to [0, 1]: 1 -> 0.95, 0.4 -> 0.35, 0.03 -> 0, 0.3 -> 0.25.
    torch.testing.assert_close(gate[:4].detach(), torch.tensor([0.95, 0.35, 0.0, 0.25]), rtol=0, atol=1e-6)
    assert gate.grad is None


def test_gates_stay_in_unit_interval_under_large_steps(gated):
    model, modules = gated
    strategy = L1RAStrategy(modules, L1RASettings(l1ra_lambda=1e-3, eta_c=5.0))
    strategy.start(total_steps=5, warmup_steps=0)
    for _ in range(5):
        model(IDS, labels=IDS).loss.backward()
        strategy.gate_step()
        model.zero_grad()
    gates = torch.cat([g.detach() for g in strategy.gates])
    assert gates.min() >= 0.0 and gates.max() <= 1.0 and (gates < 1.0).any()


def test_rank_update_keeps_function_and_untouched_optimizer_state(gated):
    model, modules = gated
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    strategy = L1RAStrategy(modules, L1RASettings(l1ra_lambda=0.0), seed=1)  # no shrink: gates stay as set
    strategy.start(total_steps=10, warmup_steps=0)
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    for gate in strategy.gates:
        gate.grad = None  # no gate gradient this step: the gate values set below are what the update sees
    donor, receiver = modules[0], modules[1]
    with torch.no_grad():
        donor.lora_A.lora_gate[[1, 2]] = 0.0  # two dead components in the donor
        receiver.lora_A.lora_gate[:4] = 1.0  # the receiver uses all of its components fully
        for m in modules[2:]:
            m.lora_A.lora_gate[:4] = 0.5
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.state}
    total_before = sum(m.rank for m in modules)
    with torch.no_grad():
        logits_before = model(IDS).logits
    record = strategy.after_optimizer_step(step=1, optimizer=optimizer)

    assert record.counts["pruned"] == 2 and record.counts["added"] == 2
    # round-robin, strongest smallest gate first: the receiver (1.0), then the next module at 0.5 (model order)
    assert (donor.rank, receiver.rank, modules[2].rank) == (2, 5, 5)
    assert sum(m.rank for m in modules) == total_before
    with torch.no_grad():  # pruned components had gate 0, new ones have B = 0: the function is unchanged
        torch.testing.assert_close(model(IDS).logits, logits_before, rtol=0, atol=1e-5)
    new = receiver.lora_A.active_index[-1:]
    assert receiver.lora_A.lora_gate[new].tolist() == [1.0]
    assert receiver.lora_B.weight[:, new].abs().sum() == 0
    for module in modules:
        for parameter, dim in ((module.lora_A.weight, 0), (module.lora_B.weight, 1)):
            state, saved = optimizer.state[parameter], moments[id(parameter)]
            untouched = [i for i in range(module.capacity) if module is not receiver or i not in new.tolist()]
            for key in ("exp_avg", "exp_avg_sq"):
                kept = state[key].index_select(dim, torch.tensor(untouched))
                torch.testing.assert_close(kept, saved[key].index_select(dim, torch.tensor(untouched)), rtol=0, atol=0)
            if module is receiver:
                assert state["exp_avg"].index_select(dim, new).abs().sum() == 0


def test_schedule_skips_step_zero_warmup_and_the_last_step(gated):
    _, modules = gated
    strategy = L1RAStrategy(modules, L1RASettings(rank_update_ratio=0.1))
    strategy.start(total_steps=100, warmup_steps=25)
    assert [s for s in range(0, 101) if strategy.is_update_step(s)] == [30, 40, 50, 60, 70, 80, 90]


def test_yaml_python_and_strategy_defaults_agree():
    from ranktune.allocation.l1ra import L1RAConfig
    from ranktune.config import validate_config

    config = validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "allocation": {"method": "l1ra"}})
    yaml_defaults = config.allocation.model_dump()
    assert yaml_defaults == L1RASettings().model_dump() == L1RAConfig(r=4).settings().model_dump()
