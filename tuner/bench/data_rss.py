"""Peak RSS of the Qwen-VL data pipeline over N conversations: `python -m tuner.bench.data_rss N`.

Run once per size in a fresh process (RSS never shrinks back in one). What is measured is what the recipe
does before and during training: read the records, measure every token length (image headers only),
group by length, then encode and collate 20 batches lazily.
"""

from __future__ import annotations

import functools
import resource
import sys
import tempfile
from pathlib import Path

import psutil
from transformers import AutoProcessor

from tuner.bench.qwenvl_bench import write_conversations
from tuner.data.conversations import load_conversations
from tuner.data.sampling import GroupedBatchSampler
from tuner.data.vl_encoding import collate_vl, token_length
from tuner.recipes.qwenvl import EncodedConversations, length_groups
from tuner.tiny import build_tiny

BATCHES = 20
BATCH_SIZE = 4


def pipeline_peak_rss_mb(conversations: int) -> tuple[float, float]:
    """(RSS before the pipeline, peak RSS while it ran), in MiB."""
    processor = AutoProcessor.from_pretrained(build_tiny("qwen2.5-vl"))
    with tempfile.TemporaryDirectory() as folder:
        data = write_conversations(Path(folder), conversations)
        before = psutil.Process().memory_info().rss / 2**20
        scan = load_conversations(data, None, check_images=True)
        lengths = [token_length(processor, conversation) for conversation in scan.conversations]
        dataset = EncodedConversations(processor, scan.conversations, 4096, "drop")
        sampler = GroupedBatchSampler(length_groups(lengths, BATCH_SIZE), batch_size=BATCH_SIZE, seed=0)
        collate = functools.partial(
            collate_vl, pad_token_id=processor.tokenizer.pad_token_id, padding_side="right"
        )
        for number, indices in enumerate(sampler):
            collate([dataset[index] for index in indices])
            if number + 1 == BATCHES:
                break
    return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    before, peak = pipeline_peak_rss_mb(int(sys.argv[1]))
    print(
        f"conversations {sys.argv[1]}: RSS before {before:.0f} MiB, peak {peak:.0f} MiB, "
        f"growth {peak - before:.0f} MiB"
    )
