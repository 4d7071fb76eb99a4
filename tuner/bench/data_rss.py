"""Peak RSS of the Qwen-VL data pipeline over N conversations: `python -m tuner.bench.data_rss N`.

Run once per size in a fresh process (RSS never shrinks back in one). Peak RSS is polled (every 5 ms)
from just before the pipeline starts, so writing the data set does not count. What is measured is what
the recipe does before and during training: read the records, measure every token length (image
headers only), group by length, then encode and collate 20 batches lazily.
"""

from __future__ import annotations

import functools
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor

from tuner.bench.measure import PeakMemory
from tuner.bench.qwenvl_bench import write_conversations
from tuner.data.conversations import load_conversations
from tuner.data.sampling import GroupedBatchSampler
from tuner.data.vl_encoding import collate_vl, token_length
from tuner.recipes.qwenvl import EncodedConversations, length_groups
from tuner.tiny import build_tiny

BATCHES = 20
BATCH_SIZE = 4


def pipeline_peak_rss_mb(conversations: int) -> dict[str, float]:
    """RSS before the pipeline, its peak while indexing (scan, token lengths, grouping) and its peak
    while encoding batches, in MiB. Indexing is what grows with the data set; a batch's cost depends
    on the images in it (bounded by data.max_pixels x batch size), not on how many records exist."""
    processor = AutoProcessor.from_pretrained(build_tiny("qwen2.5-vl"))
    with tempfile.TemporaryDirectory() as folder:
        data = write_conversations(Path(folder), conversations)
        with PeakMemory(torch.device("cpu")) as indexing:
            before = indexing.peak_mb
            dataset, sampler = _index(processor, data)
        with PeakMemory(torch.device("cpu")) as encoding:
            most_patches = _encode_batches(processor, dataset, sampler)
    return {
        "before": before,
        "indexing": indexing.peak_mb,
        "encoding": encoding.peak_mb,
        "most_patches_in_a_batch": most_patches,
    }


def _index(processor, data: Path) -> tuple[EncodedConversations, GroupedBatchSampler]:
    scan = load_conversations(data, None, check_images=True)
    lengths = [token_length(processor, conversation) for conversation in scan.conversations]
    dataset = EncodedConversations(processor, scan.conversations, 4096, "drop")
    return dataset, GroupedBatchSampler(length_groups(lengths, BATCH_SIZE), batch_size=BATCH_SIZE, seed=0)


def _encode_batches(processor, dataset: EncodedConversations, sampler: GroupedBatchSampler) -> int:
    """Encode and collate BATCHES batches; returns the most image patches one batch held."""
    pad_token_id = processor.tokenizer.pad_token_id
    collate = functools.partial(collate_vl, pad_token_id=pad_token_id, padding_side="right")
    # As many batches for 10 conversations as for 10,000 (epochs repeat).
    batches = (indices for epoch in itertools.count() for indices in _epoch(sampler, epoch))
    most_patches = 0
    for indices in itertools.islice(batches, BATCHES):
        batch = collate([dataset[index] for index in indices])
        most_patches = max(most_patches, batch["pixel_values"].shape[0] if "pixel_values" in batch else 0)
    return most_patches


def _epoch(sampler: GroupedBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


if __name__ == "__main__":
    rss = pipeline_peak_rss_mb(int(sys.argv[1]))
    before, indexing, encoding = rss["before"], rss["indexing"], rss["encoding"]
    print(
        f"conversations {sys.argv[1]}: RSS before {before:.0f} MiB; indexing peak {indexing:.0f} MiB "
        f"(+{indexing - before:.0f}); encoding {BATCHES} batches peak {encoding:.0f} MiB "
        f"(+{encoding - before:.0f}; largest batch {rss['most_patches_in_a_batch']} image patches)"
    )
