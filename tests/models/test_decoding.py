"""Generated answers decode to whole characters: no U+FFFD from a token that ends mid-character."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from tuner.models.decoding import REPLACEMENT_CHARACTER, decode_whole_characters


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model("qwen2.5-vl"))


def _ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_an_answer_cut_off_mid_character_keeps_the_whole_characters_before_it(processor):
    ids = _ids(processor, "A café")
    # The tiny byte-level vocabulary spells "é" (2 bytes) as two byte tokens: cut after the first.
    cut = ids[:-1]
    assert REPLACEMENT_CHARACTER in processor.decode(cut)  # what the tokenizer alone gives
    assert decode_whole_characters(processor, cut, skip_special_tokens=True) == "A caf"
    assert decode_whole_characters(processor, ids, skip_special_tokens=True) == "A café"


def test_bytes_that_form_no_character_inside_an_answer_are_dropped_as_utf8_ignore_drops_them(processor):
    snowman = "\u2603".encode()  # 3 bytes, 3 byte tokens in the tiny vocabulary
    ids = _ids(processor, "A") + _ids(processor, "\u2603")[:1] + _ids(processor, " red\u2603.")
    raw = b"A" + snowman[:1] + b" red" + snowman + b"."
    assert REPLACEMENT_CHARACTER in processor.decode(ids)
    answer = decode_whole_characters(processor, ids, skip_special_tokens=True)
    assert answer == raw.decode("utf-8", errors="ignore") == "A red\u2603."
