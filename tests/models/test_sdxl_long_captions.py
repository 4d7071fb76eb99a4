"""Captions longer than one CLIP window (`data.max_caption_tokens` 150/225, issue #27): encoded in windows
of 75 tokens as kohya's sd-scripts does, the pooled embedding the first window's, cached per setting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tuner.data.buckets import plan_crop
from tuner.data.captions import CaptionedImage
from tuner.models.sdxl import caption_token_count, caption_windows, encode_prompt
from tuner.models.sdxl_cache import build_sdxl_dataset

SHORT = "a red square"
MEDIUM = ", ".join(f"tag{index} red square" for index in range(12))
LONG = ", ".join(f"tag{index} blue circle on grass" for index in range(40))


def _kohya_reference(components, caption: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One caption encoded as sd-scripts does (library/train_util.py: get_input_ids, get_hidden_states_sdxl,
    pool_workaround), written out step by step on a flat sequence of windows."""
    states = []
    pooled = None
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer(caption, padding="max_length", truncation=True, max_length=max_tokens + 2).input_ids
        windows = []
        for start in range(1, max_tokens + 2 - 77 + 2, 75):
            window = [ids[0], *ids[start : start + 75], ids[-1]]
            if tokenizer.pad_token_id != tokenizer.eos_token_id:
                if window[-2] not in (tokenizer.eos_token_id, tokenizer.pad_token_id):
                    window[-1] = tokenizer.eos_token_id
                if window[1] == tokenizer.pad_token_id:
                    window[1] = tokenizer.eos_token_id
            windows.append(window)
        output = encoder(torch.tensor(windows), output_hidden_states=True)
        flat = output.hidden_states[-2].reshape(1, -1, output.hidden_states[-2].shape[-1])
        parts = [flat[:, :1]]
        for start in range(1, max_tokens, 77):
            parts.append(flat[:, start : start + 75])
        parts.append(flat[:, -1:])
        states.append(torch.cat(parts, dim=1))
        if encoder is components.text_encoder_2:
            first = torch.tensor(windows[0])
            eos_at = int(torch.argmax((first == tokenizer.eos_token_id).int()))
            pooled = encoder.text_projection(output.last_hidden_state[0, eos_at])[None]
    return torch.cat(states, dim=-1), pooled


@pytest.mark.parametrize("max_tokens", [150, 225])
def test_windows_and_pooled_embedding_match_kohyas_computation(components, max_tokens: int) -> None:
    captions = [SHORT, MEDIUM, LONG]
    assert caption_token_count(components.tokenizer, MEDIUM) > 75
    assert caption_token_count(components.tokenizer, LONG) > 225
    with torch.no_grad():
        embeds, pooled = encode_prompt(components, captions, "cpu", max_tokens)
        assert embeds.shape[:2] == (3, max_tokens + 2)
        for row, caption in enumerate(captions):
            expected_embeds, expected_pooled = _kohya_reference(components, caption, max_tokens)
            torch.testing.assert_close(embeds[row : row + 1], expected_embeds)
            torch.testing.assert_close(pooled[row : row + 1], expected_pooled)


def test_a_caption_within_one_window_starts_as_the_pipeline_encodes_it(components) -> None:
    with torch.no_grad():
        one, one_pooled = encode_prompt(components, [SHORT, MEDIUM], "cpu")
        three, three_pooled = encode_prompt(components, [SHORT, MEDIUM], "cpu", 225)
    torch.testing.assert_close(three[:, :76], one[:, :76])
    torch.testing.assert_close(three_pooled, one_pooled)
    # The medium caption's tokens past 75 reach the embedding only with more windows.
    assert not torch.allclose(three[1, 76:152], three[0, 76:152])


def test_the_second_tokenizer_closes_and_opens_windows_as_kohya_does(components) -> None:
    tokenizer = components.tokenizer_2
    windows = caption_windows(tokenizer, [MEDIUM], 225)[0]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos  # SDXL's second tokenizer pads with "!"
    assert windows[0, -1] == eos  # text runs to the end of the first window: closed with EOS
    assert windows[2, 1] == eos and windows[2, 2] == pad  # past the caption: an empty caption


def test_cached_text_is_keyed_by_the_token_setting_and_equals_direct_encoding(
    components, fingerprint, tmp_path: Path
) -> None:
    image = tmp_path / "0.png"
    Image.fromarray(np.full((64, 64, 3), 120, dtype=np.uint8)).save(image)
    samples = [CaptionedImage(image=image, caption=MEDIUM, source=f"{image}.txt")]
    plans = [plan_crop(64, 64, (64, 64))]
    items = {}
    for max_tokens in (75, 150):
        dataset = build_sdxl_dataset(
            samples,
            plans,
            components,
            cache=True,
            cache_dir=tmp_path / "cache",
            model_fingerprint=fingerprint,
            caption_options={},
            background=(255, 255, 255),
            max_image_pixels=10**8,
            random_flip=False,
            seed=0,
            device=torch.device("cpu"),
            max_caption_tokens=max_tokens,
        )
        items[max_tokens] = dataset[0]
        with torch.no_grad():
            expected, expected_pooled = encode_prompt(components, [MEDIUM], "cpu", max_tokens)
        torch.testing.assert_close(items[max_tokens]["prompt_embeds"], expected[0])
        torch.testing.assert_close(items[max_tokens]["pooled_prompt_embeds"], expected_pooled[0])
    assert items[75]["prompt_embeds"].shape[0] == 77 and items[150]["prompt_embeds"].shape[0] == 152
