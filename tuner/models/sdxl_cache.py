"""The SDXL training data: VAE latents and text-encoder outputs cached on disk, or pixels and captions.

With `cache=True` every sample's latents and both text encoders' outputs are computed once, before the
first step, and stored in safetensors shards under `cache_dir/<model fingerprint[:16]>/`:

    shard-00000.safetensors   many entries, tensors named `<key>.latents`, `<key>.prompt_embeds`, ...
    index.json                {"format_version": 1, "model_fingerprint": ..., "entries": {key: shard}}

There are two kinds of entry, so each input invalidates only what it feeds:

* a **latent entry** is keyed by the image file's content hash (or a dataset row's fingerprint), the
  crop plan (bucket, resize, crop origin, original size), the flip, the transparency background, the
  model fingerprint and the cache format version;
* a **text entry** is keyed by the caption (after the prefix), the model fingerprint and the format.

Editing one caption re-encodes one text entry, replacing one image or changing its bucket re-encodes
its latents, and another VAE or text encoder (another fingerprint) re-encodes everything. Entries no
sample refers to any more stay on disk (delete the folder to reclaim the space); identical inputs share
one entry.

Shards and the index are written to a temporary file and moved into place with `os.replace`, shard
first, so a crash leaves at most an unreferenced file that later runs ignore. Progress is saved every
`_SHARD_BYTES`, so an interrupted caching run resumes where it stopped. A file lock serialises runs that
share a cache folder; in a distributed run the main process caches and the others wait, then read.

Caption shuffling and caption dropout change the text every step, so with `shuffle_tags` or a
`dropout` above zero only the latents are cached and items carry the `caption` (prefix, shuffle and
dropout applied per access) for the recipe to encode each step; the text encoders must then stay loaded.
With `random_flip` both orientations are cached and one is picked per access.

Per-access randomness (flip, caption transforms) comes from an rng seeded with (seed, index, epoch),
where the epoch is what the loop last passed to `set_epoch` (0 by default): the same item in the same
epoch is the same on a resumed run, and each epoch draws afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tuner.data.buckets import CropPlan, apply_crop
from tuner.data.captions import CaptionedImage, transform_caption
from tuner.data.images import load_image_rgb
from tuner.models.sdxl import SDXLComponents, compute_time_ids, encode_latents, encode_prompt

logger = logging.getLogger(__name__)

# Bump when what an entry holds or how it is computed changes: every key changes with it.
CACHE_FORMAT_VERSION = 1

_INDEX_NAME = "index.json"
# A shard is written once it holds this many bytes: progress survives a crash, files stay manageable.
_SHARD_BYTES = 256 * 1024 * 1024
# Elements sampled from each weight tensor for the model fingerprint: any fine-tune or other checkpoint
# changes them, and hashing a few thousand values per tensor takes well under a second for SDXL.
_WEIGHT_SAMPLES_PER_TENSOR = 4096
_TEXT_TENSORS = ("prompt_embeds", "pooled_prompt_embeds")


def model_fingerprint(name_or_path: str, components: SDXLComponents) -> str:
    """A hash of what the cached tensors depend on: the VAE, both text encoders and both tokenizers.

    It covers their configs and a sample of every weight tensor (in the loaded dtype), not the UNet
    and not `name_or_path`: the same weights reached through a hub ID or a local folder share a cache,
    and another VAE, text encoder or precision gets its own.
    """
    digest = hashlib.sha256()
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(components, name)
        digest.update(f"[{name}]".encode())
        digest.update(_canonical_json(_config_dict(module.config)).encode())
        _update_with_weight_sample(digest, module.state_dict())
    for name in ("tokenizer", "tokenizer_2"):
        digest.update(f"[{name}]".encode())
        digest.update(_tokenizer_description(getattr(components, name)).encode())
    fingerprint = digest.hexdigest()
    logger.info("model fingerprint of %s for the SDXL cache: %s", name_or_path, fingerprint[:16])
    return fingerprint


def _config_dict(config: Any) -> dict:
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Private keys (`_name_or_path`, `_diffusers_version`, `_commit_hash`...) and library versions say
    # where a config came from, not what the model computes; the dtype is covered by the weight bytes.
    volatile = {"transformers_version", "torch_dtype", "dtype"}
    return {key: value for key, value in as_dict.items() if not key.startswith("_") and key not in volatile}


def _update_with_weight_sample(digest: Any, state_dict: dict[str, torch.Tensor]) -> None:
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.reshape(-1)
        stride = max(1, flat.numel() // _WEIGHT_SAMPLES_PER_TENSOR)
        sample = flat[::stride].contiguous().cpu()
        digest.update(sample.view(torch.uint8).numpy().tobytes())


def _tokenizer_description(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else _canonical_json(tokenizer.get_vocab())
    settings = {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
    }
    return _canonical_json(settings) + vocabulary


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def build_sdxl_dataset(
    samples: list[CaptionedImage],
    plans: list[CropPlan],
    components: SDXLComponents,
    *,
    cache: bool,
    cache_dir: Path,
    model_fingerprint: str,
    caption_options: dict,
    background: tuple[int, int, int],
    max_image_pixels: int,
    random_flip: bool,
    seed: int,
    device: torch.device,
    accelerator: Any = None,
    batch_size: int = 4,
) -> SDXLDataset:
    """The training dataset for `samples` cropped by `plans` (one plan per sample).

    `caption_options` holds `prefix`, `shuffle_tags`, `keep_tags` and `dropout`. With `cache=True`
    every entry not yet cached is encoded before this returns (VAE in fp32, encoders moved to `device`);
    see the module docstring for what items hold. The dataset keeps no reference to `components`.
    """
    if len(samples) != len(plans):
        raise ValueError(f"{len(samples)} samples but {len(plans)} crop plans")
    prefix = caption_options.get("prefix", "")
    text_per_step = bool(caption_options.get("shuffle_tags")) or caption_options.get("dropout", 0.0) > 0
    shared = _SampleSettings(
        caption_options=dict(caption_options),
        background=tuple(background),
        max_image_pixels=max_image_pixels,
        random_flip=random_flip,
        seed=seed,
    )
    items = [
        _Item(sample=sample, plan=plan, time_ids=_time_ids(plan)) for sample, plan in zip(samples, plans)
    ]
    if not cache:
        return SDXLDataset(items, shared, cached=None)

    store = ShardStore(Path(cache_dir) / model_fingerprint[:16], model_fingerprint)
    flips = (False, True) if random_flip else (False,)
    latent_keys = [
        {
            flip: _latent_key(_content_fingerprint(item.sample), item.plan, flip, shared.background, store)
            for flip in flips
        }
        for item in items
    ]
    text_keys = (
        None if text_per_step else [_text_key(_cache_caption(item.sample, prefix), store) for item in items]
    )

    is_main = accelerator is None or accelerator.is_main_process
    # The main process caches first; the others then find every entry and only read.
    in_order = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with in_order, store.locked():
        store.reload()
        latent_jobs = {keys[flip]: (item, flip) for item, keys in zip(items, latent_keys) for flip in flips}
        text_jobs = (
            {}
            if text_keys is None
            else dict(zip(text_keys, (_cache_caption(i.sample, prefix) for i in items)))
        )
        missing_latents = {key: job for key, job in latent_jobs.items() if key not in store}
        missing_texts = {key: caption for key, caption in text_jobs.items() if key not in store}
        if missing_latents or missing_texts:
            _encode_missing(
                store, components, missing_latents, missing_texts, shared, device, batch_size, is_main
            )
    cached = [
        _CachedRefs(
            latents={flip: store.location(key) for flip, key in keys.items()},
            text=None if text_keys is None else store.location(text_keys[index]),
        )
        for index, keys in enumerate(latent_keys)
    ]
    return SDXLDataset(items, shared, cached=cached)


def collate_sdxl(items: list[dict]) -> dict:
    """One batch: tensors stacked along a new first dimension, captions and sources as lists."""
    batch: dict[str, Any] = {}
    for name in items[0]:
        values = [item[name] for item in items]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


@dataclass(frozen=True)
class _SampleSettings:
    caption_options: dict
    background: tuple[int, int, int]
    max_image_pixels: int
    random_flip: bool
    seed: int


@dataclass(frozen=True)
class _Item:
    sample: CaptionedImage
    plan: CropPlan
    time_ids: torch.Tensor


@dataclass(frozen=True)
class _CachedRefs:
    """Where one item's cached tensors live: (shard file, key) per flip, and for the text if cached."""

    latents: dict[bool, tuple[str, str]]
    text: tuple[str, str] | None


class SDXLDataset(torch.utils.data.Dataset):
    """Items for the SDXL loop; built by `build_sdxl_dataset`.

    Cached: `latents`, `prompt_embeds`, `pooled_prompt_embeds` (or `caption` when the text is encoded
    per step), `time_ids`, `source`. Uncached: `pixel_values` (CHW in [-1, 1]), `caption`, `time_ids`,
    `source`.
    """

    def __init__(self, items: list[_Item], settings: _SampleSettings, cached: list[_CachedRefs] | None):
        self._items = items
        self._settings = settings
        self._cached = cached
        self._epoch = 0
        # Open shards, per process: safe_open maps the file and parses its header once.
        self._open_shards: dict[str, Any] = {}
        self._shard_folder: Path | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def plans(self) -> list[CropPlan]:
        return [item.plan for item in self._items]

    def set_epoch(self, epoch: int) -> None:
        """Draw flips and caption transforms for `epoch` (same epoch, same draws: resumes replay)."""
        self._epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self._items[index]
        settings = self._settings
        rng = random.Random(f"{settings.seed}:{index}:{self._epoch}")
        flip = settings.random_flip and rng.random() < 0.5
        result: dict[str, Any] = {}
        if self._cached is None:
            image = load_image_rgb(_image_path(item.sample), settings.background, settings.max_image_pixels)
            result["pixel_values"] = _to_model_range(apply_crop(image, item.plan, flip=flip))
        else:
            refs = self._cached[index]
            result["latents"] = self._read(*refs.latents[flip], "latents")
            if refs.text is not None:
                for name in _TEXT_TENSORS:
                    result[name] = self._read(*refs.text, name)
        if self._cached is None or self._cached[index].text is None:
            options = settings.caption_options
            result["caption"] = transform_caption(
                item.sample.caption,
                prefix=options.get("prefix", ""),
                shuffle_tags=bool(options.get("shuffle_tags", False)),
                keep_tags=int(options.get("keep_tags", 0)),
                dropout=float(options.get("dropout", 0.0)),
                rng=rng,
            )
        result["time_ids"] = item.time_ids.clone()
        result["source"] = item.sample.source
        return result

    def attach_cache_folder(self, folder: Path) -> None:
        self._shard_folder = folder

    def _read(self, shard: str, key: str, name: str) -> torch.Tensor:
        handle = self._open_shards.get(shard)
        if handle is None:
            handle = safe_open(shard, framework="pt")
            self._open_shards[shard] = handle
        return handle.get_tensor(f"{key}.{name}")

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles cannot cross into DataLoader worker processes; each worker opens its own.
        state = self.__dict__.copy()
        state["_open_shards"] = {}
        return state
