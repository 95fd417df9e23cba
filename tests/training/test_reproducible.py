"""The length-grouped shuffle depends on (seed, epoch) only, so a resumed run re-draws the epoch it resumes in."""

from __future__ import annotations

import torch

from ranktune.training.reproducible import EpochSeededLengthGroupedSampler

LENGTHS = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1, 9, 3, 5, 2, 8, 6]


def test_each_epoch_has_its_own_shuffle_whatever_the_global_rng_did():
    sampler = EpochSeededLengthGroupedSampler(batch_size=2, lengths=LENGTHS, seed=3)
    epochs = [list(sampler) for _ in range(3)]  # an epoch read to the end moves on to the next
    assert all(sorted(order) == list(range(len(LENGTHS))) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3

    resumed = EpochSeededLengthGroupedSampler(batch_size=2, lengths=LENGTHS, seed=3)
    torch.manual_seed(1234)  # a resumed run's global RNG is anywhere when the epoch starts
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
    other_seed = EpochSeededLengthGroupedSampler(batch_size=2, lengths=LENGTHS, seed=4)
    assert list(other_seed) != epochs[0]
