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


# Two buckets: 4 always-trained indices, then a pool at half share (6 + 3 members) and one at 0.25.
SHARED_GROUPS = ["square"] * 4 + ["square"] * 6 + ["wide"] * 3 + ["square"] * 4
SHARES = [None] * 4 + [("variety", 0.5)] * 9 + [("style", 0.25)] * 4


def test_fractional_shares_keep_the_epoch_length_and_draw_every_member_evenly():
    sampler = GroupedBatchSampler(SHARED_GROUPS, 2, seed=3, shares=SHARES)
    # square: 4 always + 3 of 6 at 0.5 + 1 of 4 at 0.25; wide: 2 of 3 at 0.5 (1.5 rounds up).
    assert sampler.group_sizes() == {"square": 8, "wide": 2}
    seen: Counter[int] = Counter()
    epochs = 12
    for epoch in range(epochs):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler) == 4 + 1
        drawn = [i for batch in batches for i in batch]
        assert len(drawn) == len(set(drawn)) == 10
        assert all(len({SHARED_GROUPS[i] for i in batch}) == 1 for batch in batches)
        seen.update(drawn)
    assert all(seen[i] == epochs for i in range(4))  # no share: every epoch
    for members, per_epoch in ((range(4, 10), 3), (range(10, 13), 2), (range(13, 17), 1)):
        counts = [seen[i] for i in members]
        assert sum(counts) == per_epoch * epochs and max(counts) - min(counts) <= 1, counts


def test_fractional_shares_are_a_function_of_seed_and_epoch():
    first = GroupedBatchSampler(SHARED_GROUPS, 2, seed=3, shares=SHARES)
    # A resumed run rebuilds the sampler and jumps straight to its epoch.
    rebuilt = GroupedBatchSampler(SHARED_GROUPS, 2, seed=3, shares=SHARES)
    assert [_epoch(first, epoch) for epoch in range(4)] == [_epoch(rebuilt, e) for e in (0, 1, 2, 3)]
    assert _epoch(rebuilt, 5) == _epoch(GroupedBatchSampler(SHARED_GROUPS, 2, seed=3, shares=SHARES), 5)
    chosen = [{i for batch in _epoch(first, epoch) for i in batch} for epoch in range(2)]
    assert chosen[0] != chosen[1]  # the share moves on from epoch to epoch
    other_seed = GroupedBatchSampler(SHARED_GROUPS, 2, seed=4, shares=SHARES)
    assert _epoch(other_seed, 0) != _epoch(first, 0)


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="between 0 and 1"):
        GroupedBatchSampler(["a", "a"], 1, shares=[None, ("pool", 1.5)])
