"""Two processes split every epoch's batches between them: no sample dropped, none duplicated except
the batch Accelerate repeats to give both processes the same number of steps."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tuner.data.sampling import GroupedBatchSampler

# Three buckets of 5, 3 and 3 samples at batch size 2: 3 + 2 + 2 = 7 batches per epoch, an odd number,
# so Accelerate has to pad the last round of 2 processes.
GROUPS = [0, 1, 0, 2, 0, 1, 2, 0, 1, 2, 0]
BATCH_SIZE = 2
EPOCHS = 2


@pytest.mark.slow
def test_two_processes_see_every_sample_once_per_epoch_plus_the_padding_batch(torchrun, tmp_path: Path):
    worker = ["tests/distributed/shard_worker.py", str(tmp_path), json.dumps(GROUPS)]
    done = torchrun([*worker, str(BATCH_SIZE), str(EPOCHS)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4 = 2 per device x 2 process(es) x 1 grad-accum" in done.stdout

    seen = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    sampler = GroupedBatchSampler(GROUPS, batch_size=BATCH_SIZE, seed=7)
    for epoch in range(EPOCHS):
        per_rank = [ranks[str(epoch)] for ranks in seen]
        assert len(per_rank[0]) == len(per_rank[1]) == 4  # 7 batches dealt as 4 rounds of 2
        for batch in per_rank[0] + per_rank[1]:
            assert len({GROUPS[index] for index in batch}) == 1  # a batch never mixes buckets
        counts = Counter(index for batches in per_rank for batch in batches for index in batch)
        assert set(counts) == set(range(len(GROUPS)))  # nothing dropped
        # 7 batches for 2 processes: Accelerate's even_batches repeats the epoch's first batch.
        sampler.set_epoch(epoch)
        first_batch = next(iter(sampler))
        assert counts == Counter(range(len(GROUPS))) + Counter(first_batch)
    # Only the main process wrote the run's files.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 2 * 4 + 1))
