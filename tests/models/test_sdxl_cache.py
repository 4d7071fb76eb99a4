"""The SDXL cache: cached tensors equal direct encoding, reruns reuse them, and each changed input
re-encodes exactly the entries it feeds; uncached items are deterministic per seed, index and epoch."""

from __future__ import annotations

import io
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tuner.models.sdxl_cache as sdxl_cache
from tuner.data.buckets import CropPlan, apply_crop, plan_crop
from tuner.data.captions import CaptionedImage, transform_caption
from tuner.data.images import load_image_rgb
from tuner.data.sampling import SampleKey
from tuner.errors import DataError
from tuner.models.sdxl import compute_time_ids, encode_latents, encode_prompt
from tuner.models.sdxl_cache import build_sdxl_dataset, collate_sdxl, model_fingerprint

SIZES = [(80, 64), (64, 64), (64, 96), (72, 64)]
BUCKETS = [(64, 64), (64, 64), (64, 96), (64, 64)]
CAPTIONS = ["a red cube", "a blue ball, grass, sky", "tall tower", "a red cube"]


def write_image(path: Path | io.BytesIO, size: tuple[int, int], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")


@pytest.fixture
def samples(tmp_path: Path) -> list[CaptionedImage]:
    folder = tmp_path / "images"
    folder.mkdir()
    result = []
    for index, (size, caption) in enumerate(zip(SIZES, CAPTIONS, strict=True)):
        image = folder / f"{index}.png"
        write_image(image, size, seed=index)
        result.append(CaptionedImage(image=image, caption=caption, source=f"{image}.txt"))
    return result


def plans_for(samples: list[CaptionedImage], buckets: list[tuple[int, int]]) -> list[CropPlan]:
    return [
        plan_crop(*Image.open(sample.image).size, bucket)
        for sample, bucket in zip(samples, buckets, strict=True)
    ]


class EncoderCalls:
    """Counts the images and captions the cache hands to the (real) encoders."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        self.captions: list[str] = []

        def counting_latents(components, pixel_values):
            self.images += pixel_values.shape[0]
            return encode_latents(components, pixel_values)

        def counting_prompt(components, captions, device, max_caption_tokens):
            self.captions.extend(captions)
            return encode_prompt(components, captions, device, max_caption_tokens)

        monkeypatch.setattr(sdxl_cache, "encode_latents", counting_latents)
        monkeypatch.setattr(sdxl_cache, "encode_prompt", counting_prompt)

    def reset(self) -> None:
        self.images, self.captions = 0, []


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> EncoderCalls:
    return EncoderCalls(monkeypatch)


def build(samples, plans, components, cache_dir, fingerprint, *, cache=True, **overrides):
    options = {
        "caption_options": {"prefix": "tok"},
        "background": (255, 255, 255),
        "max_image_pixels": 10**6,
        "random_flip": False,
        "seed": 7,
        "device": torch.device("cpu"),
        "batch_size": 2,
    }
    options.update(overrides)
    return build_sdxl_dataset(
        samples, plans, components, cache=cache, cache_dir=cache_dir, model_fingerprint=fingerprint, **options
    )


def expected_pixels(sample: CaptionedImage, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    image = apply_crop(load_image_rgb(sample.image), plan, flip=flip)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def test_cached_items_equal_direct_encoding(samples, components, fingerprint, tmp_path: Path) -> None:
    plans = plans_for(samples, BUCKETS)
    dataset = build(samples, plans, components, tmp_path / "cache", fingerprint)
    assert len(dataset) == len(samples)
    for index, (sample, plan) in enumerate(zip(samples, plans, strict=True)):
        item = dataset[index]
        assert set(item) == {
            "latents",
            "prompt_embeds",
            "pooled_prompt_embeds",
            "time_ids",
            "source",
            "prior",
        }
        with torch.no_grad():
            latents = encode_latents(components, expected_pixels(sample, plan)[None])[0]
            prompt_embeds, pooled = encode_prompt(components, [f"tok, {sample.caption}"], "cpu")
        torch.testing.assert_close(item["latents"], latents, atol=1e-6, rtol=0)
        assert item["latents"].shape == (4, plan.bucket[1] // 8, plan.bucket[0] // 8)
        torch.testing.assert_close(item["prompt_embeds"], prompt_embeds[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0], atol=1e-6, rtol=0)
        expected_time_ids = compute_time_ids(plan.original_size, plan.crop_top_left, plan.target_size)
        torch.testing.assert_close(item["time_ids"], expected_time_ids)
        assert item["source"] == sample.source


def test_rebuild_reuses_and_each_change_reencodes_only_its_entries(
    samples, components, fingerprint, calls: EncoderCalls, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    plans = plans_for(samples, BUCKETS)
    build(samples, plans, components, cache_dir, fingerprint)
    # Samples 0 and 3 share a caption: one text entry serves both.
    assert calls.images == 4 and sorted(calls.captions) == sorted(f"tok, {c}" for c in set(CAPTIONS))

    calls.reset()
    build(samples, plans, components, cache_dir, fingerprint)
    assert calls.images == 0 and calls.captions == []

    calls.reset()
    edited = [*samples[:1], CaptionedImage(samples[1].image, "a green ball", samples[1].source), *samples[2:]]
    dataset = build(edited, plans, components, cache_dir, fingerprint)
    assert calls.images == 0 and calls.captions == ["tok, a green ball"]
    with torch.no_grad():
        expected = encode_prompt(components, ["tok, a green ball"], "cpu")[0][0]
    torch.testing.assert_close(dataset[1]["prompt_embeds"], expected, atol=1e-6, rtol=0)

    calls.reset()
    write_image(samples[2].image, SIZES[2], seed=99)
    dataset = build(samples, plans, components, cache_dir, fingerprint)
    assert calls.images == 1 and calls.captions == []
    with torch.no_grad():
        expected = encode_latents(components, expected_pixels(samples[2], plans[2])[None])[0]
    torch.testing.assert_close(dataset[2]["latents"], expected, atol=1e-6, rtol=0)

    calls.reset()
    rebucketed = plans_for(samples, [*BUCKETS[:3], (80, 64)])
    dataset = build(samples, rebucketed, components, cache_dir, fingerprint)
    assert calls.images == 1 and calls.captions == []
    assert dataset[3]["latents"].shape == (4, 8, 10)

    calls.reset()
    build(samples, plans, components, cache_dir, "f" * 64)
    assert calls.images == 4 and len(calls.captions) == 3


def test_crash_leftovers_are_ignored_and_progress_is_kept(
    samples, components, fingerprint, calls: EncoderCalls, monkeypatch, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    plans = plans_for(samples, BUCKETS)
    real_encode = sdxl_cache.encode_latents

    def crash_on_second_batch(components, pixel_values):
        if calls.images:
            raise RuntimeError("simulated crash")
        return real_encode(components, pixel_values)

    monkeypatch.setattr(sdxl_cache, "encode_latents", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(samples, plans, components, cache_dir, fingerprint)
    monkeypatch.setattr(sdxl_cache, "encode_latents", real_encode)
    encoded_before_crash = calls.images
    assert encoded_before_crash == 2  # one batch

    store_folder = cache_dir / fingerprint[:16]
    half_written = store_folder / ".shard-00009.safetensors.abc123.tmp"
    half_written.write_bytes(b"\x00" * 100)
    calls.reset()
    dataset = build(samples, plans, components, cache_dir, fingerprint)
    assert calls.images == len(samples) - encoded_before_crash
    assert not half_written.exists()
    for index in range(len(samples)):
        with torch.no_grad():
            expected = encode_latents(components, expected_pixels(samples[index], plans[index])[None])[0]
        torch.testing.assert_close(dataset[index]["latents"], expected, atol=1e-6, rtol=0)


def test_a_damaged_shard_is_reencoded(
    samples, components, fingerprint, calls: EncoderCalls, tmp_path
) -> None:
    cache_dir = tmp_path / "cache"
    plans = plans_for(samples, BUCKETS)
    build(samples, plans, components, cache_dir, fingerprint)
    (shard,) = (cache_dir / fingerprint[:16]).glob("shard-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:50])
    calls.reset()
    dataset = build(samples, plans, components, cache_dir, fingerprint)
    assert calls.images == 4 and len(calls.captions) == 3
    assert torch.isfinite(dataset[0]["latents"]).all()


def test_caption_shuffle_caches_latents_only(samples, components, fingerprint, calls, tmp_path) -> None:
    plans = plans_for(samples, BUCKETS)
    options = {"prefix": "tok", "shuffle_tags": True, "keep_tags": 1, "dropout": 0.0}
    dataset = build(samples, plans, components, tmp_path / "cache", fingerprint, caption_options=options)
    assert calls.images == 4 and calls.captions == []
    item = dataset[1]
    assert set(item) == {"latents", "caption", "time_ids", "source", "prior"}
    assert item["caption"].startswith("tok, a blue ball, ")
    assert sorted(item["caption"].split(", ")) == sorted(["tok", "a blue ball", "grass", "sky"])


def test_random_flip_caches_both_orientations(samples, components, fingerprint, calls, tmp_path) -> None:
    plans = plans_for(samples[:1], BUCKETS[:1])
    dataset = build(samples[:1], plans, components, tmp_path / "cache", fingerprint, random_flip=True)
    assert calls.images == 2
    with torch.no_grad():
        both = encode_latents(
            components,
            torch.stack([expected_pixels(samples[0], plans[0], flip) for flip in (False, True)]),
        )
    seen = set()
    for epoch in range(12):
        latents = dataset[SampleKey(0, epoch)]["latents"]
        flipped = torch.allclose(latents, both[1], atol=1e-6)
        assert flipped or torch.allclose(latents, both[0], atol=1e-6)
        seen.add(flipped)
    assert seen == {False, True}


def test_uncached_items_are_deterministic_per_seed_index_and_epoch(samples, components, tmp_path) -> None:
    plans = plans_for(samples, BUCKETS)
    options = {"prefix": "tok", "shuffle_tags": True, "keep_tags": 0, "dropout": 0.3}

    def items(seed: int, epoch: int) -> list[dict]:
        dataset = build(
            samples,
            plans,
            components,
            tmp_path,
            "",
            cache=False,
            caption_options=options,
            seed=seed,
            random_flip=True,
        )
        return [dataset[SampleKey(index, epoch)] for index in range(len(samples))]

    first, again = items(seed=1, epoch=0), items(seed=1, epoch=0)
    for a, b in zip(first, again, strict=True):
        assert a["caption"] == b["caption"]
        torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=0, rtol=0)
    later_epochs = [items(seed=1, epoch=epoch) for epoch in (1, 2, 3)]
    assert any(
        [item["caption"] for item in epoch] != [item["caption"] for item in first] for epoch in later_epochs
    )
    item = first[0]
    assert set(item) == {"pixel_values", "caption", "time_ids", "source", "prior"}
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    # The caption is the transform the item's own rng draws: replaying the flip draw first.
    rng = random.Random("1:0:0")
    flip = rng.random() < 0.5
    assert item["caption"] == transform_caption(CAPTIONS[0], **options, rng=rng)
    torch.testing.assert_close(item["pixel_values"], expected_pixels(samples[0], plans[0], flip))


def test_an_image_unreadable_at_access_time_raises_its_data_error(samples, components, tmp_path) -> None:
    plans = plans_for(samples, BUCKETS)
    dataset = build(samples, plans, components, tmp_path, "", cache=False)
    samples[0].image.write_bytes(b"not an image")
    with pytest.raises(DataError, match=str(samples[0].image.name)):
        dataset[0]


def test_collate_stacks_tensors_and_lists_text(samples, components, fingerprint, tmp_path) -> None:
    plans = plans_for(samples, BUCKETS)
    dataset = build(samples, plans, components, tmp_path / "cache", fingerprint)
    batch = collate_sdxl([dataset[0], dataset[1]])
    torch.testing.assert_close(batch["latents"], torch.stack([dataset[0]["latents"], dataset[1]["latents"]]))
    assert batch["prompt_embeds"].shape[0] == 2 and batch["time_ids"].shape == (2, 6)
    assert batch["source"] == [samples[0].source, samples[1].source]
    uncached = build(samples, plans, components, tmp_path, "", cache=False)
    batch = collate_sdxl([uncached[0], uncached[1]])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["caption"] == ["tok, a red cube", "tok, a blue ball, grass, sky"]


class _ModuleDetector(pickle.Pickler):
    def __init__(self, file) -> None:
        super().__init__(file)
        self.modules: list[str] = []

    def persistent_id(self, obj):
        if isinstance(obj, torch.nn.Module):
            self.modules.append(type(obj).__name__)
        return None


def test_dataset_holds_no_encoder_and_pickles_for_workers(samples, components, fingerprint, tmp_path) -> None:
    plans = plans_for(samples, BUCKETS)
    dataset = build(samples, plans, components, tmp_path / "cache", fingerprint)
    expected = dataset[0]["latents"]  # opens a shard handle, which must not travel to a worker
    detector = _ModuleDetector(io.BytesIO())
    detector.dump(dataset)
    assert detector.modules == []
    copy = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(copy[0]["latents"], expected)


def test_fingerprint_follows_the_vae_weights_and_tokenizers(components, fingerprint) -> None:
    parameter = next(components.vae.parameters())
    original = parameter.detach().clone()
    with torch.no_grad():
        parameter.add_(1e-3)
    try:
        assert model_fingerprint("tiny", components) != fingerprint
    finally:
        with torch.no_grad():
            parameter.copy_(original)
    assert model_fingerprint("elsewhere", components) == fingerprint
    original_length = components.tokenizer_2.model_max_length
    components.tokenizer_2.model_max_length = 64
    try:
        assert model_fingerprint("tiny", components) != fingerprint
    finally:
        components.tokenizer_2.model_max_length = original_length


def test_distributed_build_encodes_inside_main_process_first(
    samples, components, fingerprint, monkeypatch, tmp_path
) -> None:
    events: list[str] = []

    class FakeAccelerator:
        is_main_process = True
        num_processes = 2

        @contextmanager
        def main_process_first(self) -> Iterator[None]:
            events.append("enter")
            yield
            events.append("exit: the other processes start")

    def recording_latents(components, pixel_values):
        events.append("encode")
        return encode_latents(components, pixel_values)

    monkeypatch.setattr(sdxl_cache, "encode_latents", recording_latents)
    plans = plans_for(samples, BUCKETS)
    build(samples, plans, components, tmp_path / "cache", fingerprint, accelerator=FakeAccelerator())
    assert events == ["enter", "encode", "encode", "encode", "exit: the other processes start"]


def test_dataset_rows_are_cached_by_their_image_bytes(components, fingerprint, calls, tmp_path) -> None:
    import datasets

    from tuner.data.captions import scan_caption_dataset

    encoded = []
    for seed in (1, 2):
        buffer = io.BytesIO()
        write_image(buffer, (64, 64), seed)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = datasets.Dataset.from_dict({"image": encoded, "text": ["first", "second"]}, features=features)
    table.save_to_disk(str(tmp_path / "rows"))
    samples = scan_caption_dataset(tmp_path / "rows").samples
    plans = [plan_crop(64, 64, (64, 64))] * 2
    dataset = build(samples, plans, components, tmp_path / "cache", fingerprint)
    assert calls.images == 2
    pixels = torch.stack([sdxl_cache._to_model_range(apply_crop(s.load(), plans[0])) for s in samples])
    with torch.no_grad():
        expected = encode_latents(components, pixels)
    torch.testing.assert_close(torch.stack([dataset[0]["latents"], dataset[1]["latents"]]), expected)
    calls.reset()
    build(samples, plans, components, tmp_path / "cache", fingerprint)
    assert calls.images == 0
