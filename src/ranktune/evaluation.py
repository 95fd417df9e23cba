"""Metrics for the two tasks, computed the same way during training, after it, and by `ranktune eval`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import EvalPrediction, PreTrainedModel

from ranktune.config import Task
from ranktune.data.causal_lm import IGNORE_INDEX

HEADLINE_METRICS = ("accuracy", "macro_f1", "loss", "perplexity")


def format_metrics(after: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """The headline metrics as one line: `accuracy 0.8071` or, given `before`, `accuracy 0.4871 -> 0.8071`."""
    keys = [k for k in HEADLINE_METRICS if k in after]
    if before:
        return ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in keys)
    return ", ".join(f"{k} {after[k]:.4f}" for k in keys)


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a huge number instead of overflowing."""
    return math.exp(min(loss, 50.0))


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1; a class never predicted nor present scores 0)."""
    accuracy = float(np.mean(predictions == labels)) if len(labels) else 0.0
    scores = []
    for label in range(num_labels):
        true_positive = np.sum((predictions == label) & (labels == label))
        predicted = np.sum(predictions == label)
        actual = np.sum(labels == label)
        scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
    return {"accuracy": accuracy, "macro_f1": float(np.mean(scores))}


def trainer_classification_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for transformers.Trainer."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return classification_metrics(np.argmax(logits, axis=-1), prediction.label_ids, num_labels)

    return compute


def _batches(dataset: Dataset, collator: Callable, batch_size: int, device: torch.device):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False)
    for batch in loader:
        yield {name: value.to(device) for name, value in batch.items()}


@torch.no_grad()
def predict_classes(
    model: PreTrainedModel, dataset: Dataset, collator: Callable, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max class of every example, and the true labels, in dataset order."""
    model.eval()
    predictions, labels = [], []
    for batch in _batches(dataset, collator, batch_size, model.device):
        batch_labels = batch.pop("labels")
        logits = model(**batch).logits  # (B, num_labels)
        predictions.append(logits.argmax(dim=-1).cpu().numpy())
        labels.append(batch_labels.cpu().numpy())
    return np.concatenate(predictions), np.concatenate(labels)


@torch.no_grad()
def causal_lm_loss(
    model: PreTrainedModel, dataset: Dataset, collator: Callable, batch_size: int = 8
) -> dict[str, float]:
    """Mean next-token loss over every label token (not a mean of batch means), and its perplexity."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in _batches(dataset, collator, batch_size, model.device):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()  # (B, T, V)
        targets = labels[:, 1:]  # (B, T-1)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    mean = total_loss / max(total_tokens, 1)
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": total_tokens}


def evaluate(
    model: PreTrainedModel,
    dataset: Dataset,
    collator: Callable,
    task: Task,
    num_labels: int | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Task metrics on a prepared dataset: accuracy + macro-F1, or loss + perplexity."""
    if task == "classification":
        predictions, labels = predict_classes(model, dataset, collator, batch_size)
        return {**classification_metrics(predictions, labels, int(num_labels or 0)), "examples": len(labels)}
    return causal_lm_loss(model, dataset, collator, batch_size)
