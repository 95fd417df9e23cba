"""Random numbers that a resumed run draws exactly as the uninterrupted run did.

The Trainer restores the global RNG (rng_state.pth) at the checkpoint's step, which covers dropout. Two things drew
from the global RNG outside that bracket, so a run resumed from some checkpoints trained on other batches, or with
other dropout masks, than the run it continued:

- the length-grouped sampler (our default `train_sampling_strategy`) shuffles with the global RNG when an epoch
  starts. A resumed run re-shuffles the epoch it resumes in (to skip its first batches) before the RNG is restored,
  so from a checkpoint in the second epoch or later it got another order. Here the order of epoch e comes from a
  generator seeded by (seed, e), as accelerate does for the random sampler (`SeedableRandomSampler`);
- evaluation: each DataLoader draws its base seed from the global RNG, so an evaluation that ran after a
  checkpoint was saved (at the end of an epoch, after a step-end save) shifted every later random number, and a
  resumed run that did not repeat it drew others. Here evaluation leaves the global RNG as it found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler whose shuffle in epoch e depends on (seed, e) only.

    `set_epoch` is called before every epoch (by the Trainer, through accelerate's DataLoaderShard, and by
    `ReproducibleEpochs`), also when a run resumes in the middle of one; an epoch read to the end moves on by itself.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
        yield from indices
        self.epoch += 1


class ReproducibleEpochs:
    """Trainer mixin: the seeded length-grouped sampler, and evaluations that do not consume the global RNG.

    Put it before the Trainer class in the bases: `class T(ReproducibleEpochs, Trainer)`.
    """

    _seeded_sampler: EpochSeededLengthGroupedSampler | None = None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self._seeded_sampler = EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            return self._seeded_sampler
        return sampler

    def _run_epoch(self, *args: Any, epoch: int, **kwargs: Any) -> Any:
        # The Trainer's own set_epoch does not reach the sampler when it resumes mid-epoch under DDP (accelerate's
        # BatchSamplerShard, wrapped in SkipBatchSampler, does not pass it on).
        if self._seeded_sampler is not None:
            self._seeded_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)
