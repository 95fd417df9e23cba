"""AdaLoRA on PEFT: export to vanilla LoRA, the orthogonal regulariser when the loss is computed outside the model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, PeftModel, TaskType, get_peft_model
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ranktune.allocation.adalora import AdaLoRASettings, AdaLoRAStrategy, orthogonal_regularizer, schedule_steps
from ranktune.allocation.callback import AllocationCallback
from ranktune.errors import UserInputError
from ranktune.export import write_adapter

CASES = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "classification"}
SETTINGS = AdaLoRASettings(init_r=6, target_r=3, tinit=2, tfinal=2, deltaT=1)


def load(folder, task):
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


def adalora_model(base, task: str, orth_reg_weight: float = 0.5, total_step: int = 10) -> PeftModel:
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    config = AdaLoraConfig(
        task_type=task_type,
        init_r=6,
        target_r=3,
        lora_alpha=8,
        target_modules="all-linear",
        tinit=2,
        tfinal=2,
        total_step=total_step,
        orth_reg_weight=orth_reg_weight,
    )
    return get_peft_model(base, config)


@pytest.mark.parametrize("family", CASES)
def test_exported_adalora_loads_as_plain_lora_with_the_same_logits(family, make_model_dir, tokenizer, tmp_path):
    task = CASES[family]
    folder = make_model_dir(family, task)
    torch.manual_seed(0)
    model = adalora_model(load(folder, task), task)
    strategy = AdaLoRAStrategy(model, SETTINGS)
    with torch.no_grad():
        for i, layer in enumerate(strategy.layers.values()):
            layer.lora_E["default"].normal_()
            layer.lora_E["default"][torch.arange(i % 3, 6, 3)] = 0.0  # AdaLoRA's masking: E entries set to 0
            layer.lora_B["default"].normal_(std=0.3)
        first = next(iter(strategy.layers.values()))
        first.lora_E["default"].zero_()  # a module with nothing kept must be left out
    model.eval()
    ids = torch.tensor([tokenizer("a few words to score").input_ids])
    with torch.no_grad():
        ours = model(ids).logits

    write_adapter(model, tokenizer, tmp_path / "out", factors=strategy.folded_factors())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    expected = {name: int((layer.lora_E["default"] != 0).sum()) for name, layer in strategy.layers.items()}
    expected = {name: rank for name, rank in expected.items() if rank}
    assert config["peft_type"] == "LORA" and "init_r" not in config and "orth_reg_weight" not in config
    assert config["rank_pattern"] == expected == config["alpha_pattern"] and len(expected) == len(strategy.layers) - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = PeftModel.from_pretrained(load(folder, task), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours, rtol=0, atol=1e-5)


def test_orthogonal_regularizer_is_the_one_peft_adds_to_the_loss(make_model_dir):
    folder = make_model_dir("llama", "causal_lm")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        model = adalora_model(load(folder, "causal_lm"), "causal_lm", orth_reg_weight=weight)
        losses[weight] = model(input_ids=ids, labels=ids).loss.item()
    matrices = [("lora_A" in n, p) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * orthogonal_regularizer(matrices).item(), rel=1e-5)


class Rows(Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(7, 60, (8, 12), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def shifted_cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)  # (B·(T-1), V)
    return F.cross_entropy(logits, labels[:, 1:].flatten())


class SnapshotAfterFirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.parameters: dict[str, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.parameters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_regulariser_is_added_once_per_optimizer_step_wherever_the_loss_is_computed(make_model_dir, tmp_path):
    """After one SGD step every LoRA tensor must equal θ - lr · ∇(task loss + w · R), computed here by autograd, with
    the loss computed by the model or by a compute_loss_func, and with the batch split over 2 accumulation steps."""
    folder = make_model_dir("llama", "causal_lm")
    weight, lr = 2.0, 0.5

    def first_step(outside: bool, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = adalora_model(load(folder, "causal_lm"), "causal_lm", orth_reg_weight=weight)
        strategy = AdaLoRAStrategy(
            model, AdaLoRASettings(init_r=6, target_r=3, tinit=2, tfinal=0, orth_reg_weight=weight)
        )
        snapshot = SnapshotAfterFirstStep()
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation, learning_rate=lr, optim="sgd", lr_scheduler_type="constant",
            max_grad_norm=0.0, train_sampling_strategy="sequential", report_to="none", save_strategy="no",
            use_cpu=True,
        )  # fmt: skip
        callbacks = [AllocationCallback(strategy), snapshot]
        loss_func = shifted_cross_entropy if outside else None
        Trainer(model=model, args=args, train_dataset=Rows(), compute_loss_func=loss_func, callbacks=callbacks).train()
        return snapshot.parameters

    torch.manual_seed(0)
    model = adalora_model(load(folder, "causal_lm"), "causal_lm", orth_reg_weight=0.0)
    model.train()
    ids = Rows().ids[:4]
    named = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    matrices = [("lora_A" in n, p) for n, p in named.items() if "lora_A" in n or "lora_B" in n]
    total = model(input_ids=ids, labels=ids).loss + weight * orthogonal_regularizer(matrices)
    grads = dict(zip(named, torch.autograd.grad(total, list(named.values())), strict=True))
    expected = {n: (p - lr * grads[n]).detach() for n, p in named.items()}

    for outside, accumulation in [(False, 1), (True, 1), (False, 2)]:
        trained = first_step(outside, accumulation)
        for name, value in expected.items():
            torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-5, msg=f"{name} {outside} {accumulation}")


def test_schedule_accepts_steps_or_fractions_and_refuses_a_schedule_without_room():
    assert schedule_steps(AdaLoRASettings(init_r=6, target_r=3, tinit=0.1, tfinal=0.25), 40) == (4, 10)
    assert schedule_steps(AdaLoRASettings(init_r=6, target_r=3, tinit=5, tfinal=0.5), 40) == (5, 20)
    with pytest.raises(UserInputError, match="tinit 8 \\+ tfinal 2 steps out of 10"):
        schedule_steps(AdaLoRASettings(init_r=6, target_r=3, tinit=8, tfinal=2), 10)
    with pytest.raises(UserInputError, match="tinit 0 \\+ tfinal 0 steps out of 1 "):
        schedule_steps(AdaLoRASettings(init_r=6, target_r=3, tinit=0, tfinal=0), 1)
