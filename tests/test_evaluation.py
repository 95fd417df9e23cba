"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ranktune.evaluation import causal_lm_loss, classification_metrics


def test_accuracy_and_macro_f1_by_hand():
    predictions = np.array([0, 0, 1, 1, 2, 0])
    labels = np.array([0, 1, 1, 1, 2, 2])
    # class 0: tp 1, predicted 3, actual 1 -> 2/4 ; class 1: tp 2, predicted 2, actual 3 -> 4/5 ;
    # class 2: tp 1, predicted 1, actual 2 -> 2/3
    metrics = classification_metrics(predictions, labels, num_labels=3)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_absent_class_counts_as_zero_f1():
    metrics = classification_metrics(np.array([0, 0]), np.array([0, 0]), num_labels=2)
    assert metrics == {"accuracy": 1.0, "macro_f1": 0.5}


def test_causal_lm_loss_is_token_weighted(make_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(make_model_dir("llama")).eval()
    rows = [tokenizer("hello there").input_ids, tokenizer("a much longer sentence here").input_ids]
    dataset = [{"input_ids": ids, "labels": ids} for ids in rows]

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.tensor([b["input_ids"] + [0] * (width - len(b["input_ids"])) for b in batch])
        labels = torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch])
        mask = (labels != -100).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    metrics = causal_lm_loss(model, dataset, collate, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            logits = model(torch.tensor([ids])).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
