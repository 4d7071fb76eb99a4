"""Batches whose samples share a group, in an order that a resumed run can reproduce exactly."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from tuner.errors import ConfigError

# Keeps the seeds of the pools' fixed orders apart from the (seed, epoch) seeds of the shuffles.
_POOL_STREAM = 7919


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

    `shares` gives some indices a fractional share of an epoch (repeats such as 0.5, data.sources):
    `(pool, fraction)` for an index that trains in only `fraction` of the epochs, None for one that
    trains every epoch. Inside each group, the members of a pool take turns: every epoch takes the
    next `share_count(fraction, members)` of them from a seeded fixed order of the pool, so each group
    holds the same number of samples every epoch (len does not vary, a resume rebuilds the epoch) and
    over the epochs every member is drawn as often as any other, give or take one.
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        shares: Sequence[tuple[Hashable, float] | None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if shares is not None and len(shares) != len(groups):
            raise ValueError(f"{len(groups)} groups but {len(shares)} shares")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        # Indices that train every epoch, per group; and per group, the pools that take turns.
        self._members: dict[Hashable, list[int]] = {}
        pools: dict[Hashable, dict[Hashable, tuple[float, list[int]]]] = {}
        for index, group in enumerate(groups):
            members = self._members.setdefault(group, [])
            share = shares[index] if shares is not None else None
            if share is None:
                members.append(index)
                continue
            pool, fraction = share
            if not 0 < fraction < 1:
                raise ValueError(f"the share of index {index} must be between 0 and 1, got {fraction}")
            pools.setdefault(group, {}).setdefault(pool, (fraction, []))[1].append(index)
        # Each pool in a fixed order drawn from the seed alone (not the epoch), which the epochs walk
        # through in turn: (fraction, members in that order).
        self._pools: dict[Hashable, list[tuple[float, list[int]]]] = {}
        ordinal = 0
        for group, by_pool in pools.items():
            for fraction, members in by_pool.values():
                order = np.random.default_rng((self.seed, _POOL_STREAM, ordinal)).permutation(len(members))
                self._pools.setdefault(group, []).append((fraction, [members[i] for i in order]))
                ordinal += 1

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
        for group in self._members:
            members = self._epoch_members(group, self.epoch)
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
        return sum(rounding(size / self.batch_size) for size in self.group_sizes().values())

    def group_sizes(self) -> dict[Hashable, int]:
        """Group -> samples it holds in every epoch (pools count with their share of the epoch)."""
        return {
            group: len(members)
            + sum(share_count(fraction, len(pool)) for fraction, pool in self._pools.get(group, []))
            for group, members in self._members.items()
        }

    def partial_groups(self) -> dict[Hashable, int]:
        """Group -> size for groups smaller than batch_size (dropped entirely when drop_last)."""
        return {group: size for group, size in self.group_sizes().items() if size < self.batch_size}

    def _epoch_members(self, group: Hashable, epoch: int) -> list[int]:
        """The indices of `group` that train in `epoch`: every-epoch members, then each pool's turn."""
        members = list(self._members[group])
        for fraction, pool in self._pools.get(group, []):
            count = share_count(fraction, len(pool))
            start = epoch * count
            members.extend(pool[(start + offset) % len(pool)] for offset in range(count))
        return members


def share_count(fraction: float, members: int) -> int:
    """How many of a pool's `members` train per epoch with a share of `fraction`: the nearest whole
    number (halves up), but at least one, so that no image of a small bucket is never trained."""
    return max(1, math.floor(fraction * members + 0.5))


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
