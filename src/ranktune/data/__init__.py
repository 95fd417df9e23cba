"""Data: reading sources, turning examples into token rows for each task, and batching them."""

from ranktune.data.causal_lm import detect_format, prepare_causal_lm
from ranktune.data.classification import prepare_classification
from ranktune.data.collators import build_collator
from ranktune.data.sources import load_file, load_splits, subsample

__all__ = [
    "build_collator",
    "detect_format",
    "load_file",
    "load_splits",
    "prepare_causal_lm",
    "prepare_classification",
    "subsample",
]
