"""Training: TrainingArguments from the config, Trainer callbacks, and the end-to-end `train` run."""

from ranktune.training.run import TrainResult, train

__all__ = ["TrainResult", "train"]
