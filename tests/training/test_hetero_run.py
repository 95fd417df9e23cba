"""HeteroLoRA's dynamic search on a tiny llama: the top `keep` modules on, the rest frozen, offline and online."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from ranktune.allocation.components import install_gates
from ranktune.allocation.hetero import HeteroSettings, HeteroStrategy
from ranktune.allocation.saliency import lora_layers, probe_directions, score_modules
from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.reports import enabled_share
from ranktune.training import train
from tests.cli.helpers import run_cli
from tests.training.resume import assert_resume_is_exact, history, over_two_epochs
from tests.training.test_run import text_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # 2 layers: 10 modules


def hetero_config(model_dir, tmp_path, **allocation):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = text_config(model_dir, tmp_path, max_steps=12, logging_steps=4, seed=3)
    config["lora"] = {"r": 4, "dropout": 0.0, "target_modules": TARGETS}
    config["allocation"] = {"method": "hetero", "every": 4, "keep": 0.3, "batches": 2, **allocation}
    return config


def reallocations(out) -> dict[int, dict[str, dict]]:
    rows = [json.loads(line) for line in (out / "reallocation_history.jsonl").read_text().splitlines()]
    by_step: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], {})[row["module"]] = row
    return by_step


@pytest.mark.parametrize("online", [False, True])
def test_dynamic_search_keeps_the_top_fraction_and_exports_it(online, make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    result = train(validate_config(hetero_config(model_dir, tmp_path, online=online)))
    steps = reallocations(result.output_dir)
    assert sorted(steps) == ([4, 8] if online else [0, 4, 8])  # offline also selects before the first step
    for rows in steps.values():
        assert len(rows) == 10 and sum(r["enabled"] for r in rows.values()) == math.floor(0.3 * 10)
        kept_scores = [r["score"] for r in rows.values() if r["enabled"]]
        assert min(kept_scores) >= max(r["score"] for r in rows.values() if not r["enabled"])
        assert all(r["score"] > 0 for r in rows.values())
    records = history(result.output_dir)
    assert all(r["total_rank"] == 3 * 4 for r in records if r["step"] > 0 or not online)

    final = {name for name, row in steps[8].items() if row["enabled"]}
    adapter = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(final) and set(adapter["rank_pattern"].values()) == {4}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.output_dir)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[5, 6, 7, 8]])).logits).all()

    shown = run_cli("inspect", str(result.output_dir), "--plot", str(tmp_path / "ranks.png"))
    assert shown.returncode == 0, shown.stderr
    for png in ("ranks.png", "ranks-evolution.png", "ranks-enabled.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"plot: {tmp_path / png}" in shown.stdout
    share = enabled_share([row for rows in steps.values() for row in rows.values()])
    expected = {n: sum(rows[n]["enabled"] for rows in steps.values()) / len(steps) for n in steps[8]}
    assert share == expected


def test_disabled_modules_keep_parameters_and_optimizer_state_frozen(make_model_dir):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    modules = install_gates(model, 4)
    strategy = HeteroStrategy(model, modules, HeteroSettings(heuristic="constant", keep=0.5), lambda step: [], 10)
    strategy.start(total_steps=10, warmup_steps=0)  # constant scores: a seeded half is enabled
    disabled = [m for m in modules if not strategy.enabled[m.name]]
    assert len(disabled) == 2 and all(m.rank == 0 for m in disabled)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    frozen = {m.name: (m.lora_A.weight.detach().clone(), m.lora_B.weight.detach().clone()) for m in disabled}
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        strategy.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
    for m in disabled:
        assert torch.equal(m.lora_A.weight, frozen[m.name][0]) and torch.equal(m.lora_B.weight, frozen[m.name][1])
        assert m.lora_A.weight not in optimizer.state  # no moments, no step count, no weight decay
    enabled = [m for m in modules if strategy.enabled[m.name]]
    assert all(m.lora_B.weight.abs().sum() > 0 for m in enabled)


def test_interrupted_and_resumed_dynamic_search_gives_the_same_adapter(make_model_dir, tmp_path):
    """With LoRA dropout, from checkpoints in the second epoch of 16 steps (reallocations at 4, 8 and 12): at step 12,
    at step 8 (the epoch's start) and at step 11 (where a SIGTERM stopped the run)."""
    model_dir = make_model_dir("llama")
    straight, checkpointed = (over_two_epochs(hetero_config(model_dir, tmp_path / name)) for name in "ab")
    assert_resume_is_exact(straight, checkpointed, save_steps=4, resume_steps=[12, 8], stop_after=11)
    rows = (tmp_path / "b" / "out" / "reallocation_history.jsonl").read_text().splitlines()
    assert len(rows) == 4 * 10  # steps 0, 4, 8 and 12: what the dead runs wrote after their checkpoints was dropped


def test_online_scoring_needs_a_gradient_heuristic(make_model_dir, tmp_path):
    config = hetero_config(make_model_dir("llama"), tmp_path, online=True, heuristic="synflow")
    with pytest.raises(UserInputError, match="online scoring uses the training gradients"):
        validate_config(config)


class TwoBranches(torch.nn.Module):
    """y = left(x[:, :8]) + right(x[:, 8:]), loss MSE against the labels: each branch sees only its half of the
    input, so a batch whose left half is zero gives `left` no gradient at all, and the other way round."""

    def __init__(self) -> None:
        super().__init__()
        self.left = torch.nn.Linear(8, 8, bias=False)
        self.right = torch.nn.Linear(8, 8, bias=False)
        torch.nn.init.zeros_(self.left.weight)
        torch.nn.init.zeros_(self.right.weight)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        output = self.left(inputs[:, :8]) + self.right(inputs[:, 8:])  # (batch, 8)
        return types.SimpleNamespace(loss=torch.nn.functional.mse_loss(output, labels))


def branch_batches(branch: str, seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches whose targets only `branch` can produce: its half of the input random, the other half zero."""
    generator = torch.Generator().manual_seed(seed)
    mapping = torch.randn(8, 8, generator=generator)
    half = torch.randn(32, 8, generator=generator)  # (rows, 8)
    zero = torch.zeros_like(half)
    inputs = torch.cat([half, zero] if branch == "left" else [zero, half], dim=1)  # (rows, 16)
    return [{"inputs": inputs[i : i + 8], "labels": half[i : i + 8] @ mapping.T} for i in range(0, 32, 8)]


@pytest.mark.parametrize("scoring", ["fresh", "switched_on"])
def test_the_search_follows_data_whose_useful_module_changes_halfway(scoring):
    """The scoring batches need `left` for the first 8 steps and `right` after: the selection must move."""
    torch.manual_seed(0)
    model = get_peft_model(TwoBranches(), LoraConfig(r=2, lora_alpha=2, target_modules=["left", "right"]))
    modules = install_gates(model, 0)
    settings = HeteroSettings(heuristic="grad_norm", every=4, keep=0.5, batches=4, scoring=scoring)

    def draw(step: int) -> list[dict[str, torch.Tensor]]:
        return branch_batches("left" if step < 8 else "right", seed=step)

    strategy = HeteroStrategy(model, modules, settings, draw, steps_per_epoch=16)
    rows = [strategy.start(total_steps=16, warmup_steps=0)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 16):
        for batch in draw(step - 1):
            model(**batch).loss.backward()
            strategy.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad()
        row = strategy.after_optimizer_step(step, optimizer)
        if row is not None:
            rows.append(row)
    chosen = {row.step: [n for n, m in row.snapshot.modules.items() if m["enabled"]] for row in rows}
    assert chosen == {0: ["left"], 4: ["left"], 8: ["right"], 12: ["right"]}
    assert [row.counts for row in rows] == [
        {},
        {"switched_on": 0, "switched_off": 0},
        {"switched_on": 1, "switched_off": 1},
        {"switched_on": 0, "switched_off": 0},
    ]
    assert strategy.closing_note() is None
    assert model.base_model.model.left.lora_B["default"].weight.abs().sum() > 0  # `left` trained while it was on


def test_fresh_scores_are_the_gradient_of_a_fresh_lora_b(make_model_dir):
    """A candidate's fresh score is scale · ||G A₀ᵀ||, G the gradient of the mean loss over the batches with
    respect to the module's base weight (taken here by autograd on that weight), A₀ its probe directions; the
    candidates' own trained, switched-off factors change nothing but the model the gradient is taken at."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # a trained state: every B non-zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    ids = torch.arange(5, 29).view(3, 8)
    batches = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(3)]
    scores = score_modules(model, batches, "grad_norm", fresh_seed=7)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind for the optimizer to see

    weights = {name: layer.base_layer.weight for name, layer in lora_layers(model).items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    model.eval()
    for batch in batches:
        model(**batch).loss.backward()
    assert len(scores) == 4
    for name, weight in weights.items():
        directions = probe_directions(name, 4, weight.shape[1], seed=7)  # (4, in)
        expected = float((8 / 4) * (weight.grad @ directions.T).norm()) / len(batches)  # of the mean loss
        assert scores[name] == pytest.approx(expected, rel=1e-4)


def test_a_search_that_never_changes_says_so(make_model_dir, tmp_path):
    """keep 1.0 enables every candidate at every reallocation: the run and `inspect` both say the selection never
    changed."""
    config = hetero_config(make_model_dir("llama"), tmp_path, keep=1.0)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stderr
    assert "the dynamic search kept the same 10 candidates at all 3 reallocations" in result.stderr
    shown = run_cli("inspect", str(tmp_path / "out"))
    assert "reallocations: 3 (steps 0, 4, 8); the selection never changed after the first" in shown.stdout
    counts = [(r.get("switched_on"), r.get("switched_off")) for r in history(tmp_path / "out")]
    assert counts == [(None, None), (0, 0), (0, 0)]
