from __future__ import annotations

import pickle
from collections import Counter

import pytest

from tuner.data.sampling import GroupedBatchSampler, SampleKey, epoch_of

GROUPS = ["square"] * 7 + ["portrait"] * 5 + ["wide"] * 2 + ["tall"] * 1


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_a_function_of_seed_and_epoch():
    first, again = GroupedBatchSampler(GROUPS, 2, seed=1), GroupedBatchSampler(GROUPS, 2, seed=1)
    assert _epoch(first, 0) == _epoch(again, 0)
    assert _epoch(first, 3) == _epoch(again, 3)
    assert _epoch(first, 0) != _epoch(first, 1)
    assert _epoch(first, 0) != _epoch(GroupedBatchSampler(GROUPS, 2, seed=2), 0)
    # Seed and epoch are not simply added.
    assert _epoch(GroupedBatchSampler(GROUPS, 2, seed=0), 1) != _epoch(
        GroupedBatchSampler(GROUPS, 2, seed=1), 0
    )


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_index_once_per_epoch_and_groups_never_mixed(shuffle):
    sampler = GroupedBatchSampler(GROUPS, 3, seed=5, shuffle=shuffle)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == 3 + 2 + 1 + 1
        assert sorted(i for batch in batches for i in batch) == list(range(len(GROUPS)))
        assert all(len({GROUPS[i] for i in batch}) == 1 for batch in batches)
        assert all(1 <= len(batch) <= 3 for batch in batches)


def test_shuffle_interleaves_groups_and_off_keeps_index_order():
    ordered = list(GroupedBatchSampler(GROUPS, 2, shuffle=False))
    assert ordered[:2] == [[0, 1], [2, 3]]
    shuffled = GroupedBatchSampler(GROUPS * 4, 2, seed=0)
    first_groups = [GROUPS[(batch[0]) % len(GROUPS)] for batch in shuffled][:8]
    assert len(set(first_groups)) > 1


def test_drop_last_drops_partial_batches_and_partial_groups_are_reported():
    sampler = GroupedBatchSampler(GROUPS, 3, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 + 1
    assert all(len(batch) == 3 for batch in batches)
    assert sampler.partial_groups() == {"wide": 2, "tall": 1}
    assert Counter(GROUPS[b[0]] for b in batches) == {"square": 2, "portrait": 1}


def test_keyed_batches_carry_the_epoch_through_pickling():
    sampler = GroupedBatchSampler(GROUPS, 2, seed=1)
    sampler.set_epoch(3)
    keyed = list(sampler.keyed())
    assert [[int(key) for key in batch] for batch in keyed] == _epoch(sampler, 3)
    # A worker process receives the keys pickled: the epoch must survive, and the key still indexes.
    key = pickle.loads(pickle.dumps(keyed[0][0]))
    assert isinstance(key, SampleKey) and epoch_of(key) == 3 and int(key) == keyed[0][0]
    assert ["a", "b", "c"][SampleKey(2, 5)] == "c" and epoch_of(2) == 0
