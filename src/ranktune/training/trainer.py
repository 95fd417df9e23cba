"""The Trainer that `ranktune train` runs: transformers' Trainer with complete checkpoints and exact resumes."""

from __future__ import annotations

from transformers import Trainer

from ranktune.allocation.callback import SynchronizedBeforeClipping
from ranktune.training.checkpoints import CheckpointFilesFirst
from ranktune.training.reproducible import ReproducibleEpochs
from ranktune.training.sharding import WholeAdapterUnderFSDP
from ranktune.training.zero import WeightsOnlyDeepSpeedCheckpoints


class RanktuneTrainer(
    SynchronizedBeforeClipping,
    WholeAdapterUnderFSDP,
    WeightsOnlyDeepSpeedCheckpoints,
    CheckpointFilesFirst,
    ReproducibleEpochs,
    Trainer,
):
    """Writes its callbacks' checkpoint files before the Trainer's own (`training/checkpoints.py`), draws its
    random numbers so that a resumed run continues exactly (`training/reproducible.py`), under FSDP2 shards the
    base model only (`training/sharding.py`), and under DeepSpeed reads its checkpoints without unpickling
    arbitrary objects (`training/zero.py`)."""
