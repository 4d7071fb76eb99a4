"""Tiny byte-level BPE vocabularies learned locally, so tiny tokenizers never need a download.

transformers 5.x tokenizer constructors (CLIPTokenizer, Qwen2Tokenizer) take `vocab`/`merges` objects;
this module produces them from a short built-in corpus with a deterministic merge order.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

from tokenizers import pre_tokenizers

# Caption- and chat-like text: enough to learn merges for common English fragments.
CORPUS = """\
a photo of a cat sitting on a red chair in the garden
a painting of a dog running on the beach at sunset, high quality
the image shows two people walking in the city at night
describe this image. what is in the picture? the picture shows a small house
you are a helpful assistant. answer the question about the image
a close up photo of a flower with green leaves and blue sky
there is a car on the street next to the building
"""

# GPT-2's byte-to-unicode table, as the `tokenizers` ByteLevel pre-tokenizer uses it; sorted so the
# vocabulary ids do not depend on set ordering.
BYTE_ALPHABET: list[str] = sorted(pre_tokenizers.ByteLevel.alphabet())


def learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def _vocab_with_merges(base: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {token: index for index, token in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def gpt2_style_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE as Qwen uses it (no end-of-word marker): 256 byte symbols plus the merges."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(
        tuple(piece) for line in CORPUS.splitlines() for piece, _ in pre_tokenizer.pre_tokenize_str(line)
    )
    merges = learn_merges(words, num_merges)
    return _vocab_with_merges(BYTE_ALPHABET, merges), merges


def clip_style_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE as CLIP uses it: lowercase words whose last symbol carries `</w>`."""
    words: Counter[tuple[str, ...]] = Counter()
    for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", CORPUS.lower()):
        words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = learn_merges(words, num_merges)
    base = BYTE_ALPHABET + [symbol + "</w>" for symbol in BYTE_ALPHABET]
    return _vocab_with_merges(base, merges), merges
