"""Generated token ids to text that holds whole characters only.

Byte-level BPE tokenizers (Qwen's) spell a character outside ASCII as several byte tokens. A reply cut off
by `max_new_tokens`, or a small model that emits byte tokens in an order no text has, leaves bytes that
form no character; the tokenizers' decoders replace each such sequence with U+FFFD (lossy UTF-8), which
then shows up in answers, scores and reports as a broken character. Every place that decodes a generated
answer (tuner infer, tuner eval, evaluation and sample answers during training) decodes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


def decode_whole_characters(tokenizer: Any, token_ids: Sequence[int] | Any, skip_special_tokens: bool) -> str:
    """`tokenizer.decode(token_ids)` without the bytes that form no whole character.

    `tokenizer` is a tokenizer or a processor (both have `decode`). What is dropped is what Python's
    `bytes.decode("utf-8", errors="ignore")` drops: a trailing incomplete character and any invalid byte
    sequence inside the text, the places where the tokenizer's decoder puts U+FFFD.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
    return text.replace(REPLACEMENT_CHARACTER, "")
