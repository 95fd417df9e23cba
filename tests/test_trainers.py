"""The seed's L1RA usage example, run as written with a local model and data and TRL's current argument names."""

from __future__ import annotations

import json

import torch
from datasets import Dataset
from peft import PeftModel, TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
from trl import SFTConfig

from ranktune import L1RAConfig, L1RASFTTrainer, L1RATrainer

TEXTS = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(48)]


def l1ra_config() -> L1RAConfig:
    return L1RAConfig(
        task_type=TaskType.CAUSAL_LM,
        r=4,
        lora_alpha=4,
        lora_dropout=0.1,
        target_modules="all-linear",
        bias="none",
        l1ra_lambda=5.0,  # strong enough that gates reach 0 within a 10-step test
        eta_c=0.05,
        rank_update_ratio=0.2,
    )


def test_seed_example_with_sft_trainer_saves_loads_and_resumes(make_model_dir, tmp_path):
    model_id = make_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(model_id)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    dataset = Dataset.from_dict({"text": TEXTS}).train_test_split(test_size=8, seed=0)
    training_args = SFTConfig(
        output_dir=str(tmp_path / "trainer_output"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,  # transformers 5 folds warmup_ratio into warmup_steps
        weight_decay=0.1,
        num_train_epochs=1,
        max_grad_norm=0.3,
        optim="adamw_torch",
        save_steps=5,  # the default save strategy, unlike the seed's mandatory save_strategy="no"
        dataset_text_field="text",
        max_length=64,
        bf16=False,  # the seed trains in bf16 on a GPU; TRL's SFTConfig defaults to it, which CPUs refuse
        report_to="none",
    )
    trainer = L1RASFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        peft_config=l1ra_config(),
        eval_dataset=dataset["test"],
        processing_class=tokenizer,  # TRL 1.x pads and builds labels itself; the seed's LM collator is not needed
    )
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "trainer_output").glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-5",
    ]
    history = [
        json.loads(line) for line in (tmp_path / "trainer_output" / "rank_history.jsonl").read_text().splitlines()
    ]
    assert sum(r.get("pruned", 0) for r in history) > 0

    trainer.save_model(str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    strategy_ranks = {m.name: m.rank for m in trainer.l1ra.strategy.modules if m.rank}
    assert config["rank_pattern"] == strategy_ranks and "l1ra_lambda" not in config
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_id), tmp_path / "adapter").eval()
    trainer.model.eval()
    ids = torch.tensor([tokenizer("the quick brown fox").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trainer.model(ids).logits, rtol=0, atol=1e-5)

    resumed = L1RASFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_id),
        args=training_args,
        train_dataset=dataset["train"],
        peft_config=l1ra_config(),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "trainer_output" / "checkpoint-5"))
    assert {m.name: m.rank for m in resumed.l1ra.strategy.modules} == {
        m.name: m.rank for m in trainer.l1ra.strategy.modules
    }


def test_plain_trainer_variant_trains_and_exports(make_model_dir, tmp_path, tokenizer):
    from transformers import TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(make_model_dir("gpt2"))
    rows = [tokenizer(text, truncation=True, max_length=48) for text in TEXTS]
    dataset = Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows])
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=10,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
    )
    trainer = L1RATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        peft_config=l1ra_config(),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sum(config["rank_pattern"].values()) <= 4 * 8  # 8 adapted modules in 2 gpt2 blocks, rank 4 each
    assert max(m.rank for m in trainer.l1ra.strategy.modules) <= 8
