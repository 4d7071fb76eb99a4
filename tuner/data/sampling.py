"""Batches whose samples share a group, in an order that a resumed run can reproduce exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from tuner.errors import ConfigError

T = TypeVar("T")


class SampleKey(int):
    """A sample index that carries the epoch it is drawn in, from the batch sampler into the dataset.

    Every random draw of a sample (flip, caption dropout and shuffle, noise, timestep) is seeded from
    (seed, epoch, index), and the epoch must travel with the index: a data-loader worker keeps the
    dataset copy it was started with, so an epoch set on the main process's dataset never reaches it.
    An `int` subclass, so a dataset that draws nothing at random indexes with it as with any int.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.epoch = epoch
        return key

    def __reduce__(self) -> tuple[Any, ...]:
        # Keys are pickled into the worker processes; the default int pickling would drop the epoch.
        return SampleKey, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"SampleKey(index={int(self)}, epoch={self.epoch})"


def epoch_of(key: int) -> int:
    """The epoch a `SampleKey` was drawn in; 0 for a plain index (validation, a dataset read directly)."""
    return getattr(key, "epoch", 0)


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches whose indices all share a group (SDXL: aspect bucket; Qwen-VL: token-length bin).

    Order is a pure function of (seed, epoch), independent of the global RNGs, so a resumed run
    can rebuild an epoch and skip what it already consumed. With shuffle=True the samples inside
    each group are shuffled, and then the batches of all groups are shuffled together, so groups
    interleave instead of training on one bucket at a time. The partial last batch of a group is
    yielded (no image silently lost) unless drop_last.
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._members: dict[Hashable, list[int]] = {}
        for index, group in enumerate(groups):
            self._members.setdefault(group, []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keyed(self) -> Iterator[list[SampleKey]]:
        """This epoch's batches, each index a `SampleKey` of the epoch (what the training loop loads)."""
        epoch = self.epoch
        for batch in self:
            yield [SampleKey(index, epoch) for index in batch]

    def __iter__(self) -> Iterator[list[int]]:
        # A SeedSequence over (seed, epoch) keeps (0, 1) and (1, 0) apart, unlike seed + epoch.
        rng = np.random.default_rng((self.seed, self.epoch))
        batches: list[list[int]] = []
        for members in self._members.values():
            order = rng.permutation(len(members)) if self.shuffle else range(len(members))
            shuffled = [members[i] for i in order]
            for start in range(0, len(shuffled), self.batch_size):
                batch = shuffled[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(members) / self.batch_size) for members in self._members.values())

    def partial_groups(self) -> dict[Hashable, int]:
        """Group -> size for groups smaller than batch_size (dropped entirely when drop_last)."""
        return {group: len(m) for group, m in self._members.items() if len(m) < self.batch_size}


def held_out_indices(count: int, fraction: float, seed: int) -> set[int]:
    """A seeded random `fraction` of `count` indices held out for validation (at least one if asked)."""
    if fraction <= 0:
        return set()
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held_out = set(order[: max(1, round(fraction * count))])
    if len(held_out) >= count:
        raise ConfigError(
            f"data.validation_fraction {fraction} leaves no training samples out of {count}",
            hint="lower data.validation_fraction or add samples",
        )
    return held_out


def split_validation(samples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(training, validation) samples, the validation ones chosen by `held_out_indices`."""
    held_out = held_out_indices(len(samples), fraction, seed)
    return (
        [sample for index, sample in enumerate(samples) if index not in held_out],
        [sample for index, sample in enumerate(samples) if index in held_out],
    )
