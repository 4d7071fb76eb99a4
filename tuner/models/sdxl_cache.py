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

With masked loss (`data.masked_loss`), the latent entry of an image with a mask also holds the mask at
latent resolution (`<key>.mask`), and its key also holds the mask file's content hash (or `alpha`):
editing a mask re-encodes its image's entry. The mask is resized, cropped and flipped exactly as its
image (`apply_crop` with the image's plan), then area-averaged down to the latents' size; an image
without a mask gets a mask of ones, which is not stored.

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
where the epoch travels with the index (a `tuner.data.sampling.SampleKey`; a plain index is epoch 0):
the same item in the same epoch is the same in any data-loader worker and on a resumed run, and each
epoch draws afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tuner.atomic import TEMP_SUFFIX, write_atomically
from tuner.data.buckets import CropPlan, apply_crop
from tuner.data.captions import CaptionedImage, caption_prefix_of, transform_caption
from tuner.data.masks import load_mask
from tuner.data.sampling import epoch_of
from tuner.errors import DataError
from tuner.models.sdxl import (
    WINDOW_TOKENS,
    SDXLComponents,
    compute_time_ids,
    encode_latents,
    encode_prompt,
)

logger = logging.getLogger(__name__)

# Bump when what an entry holds or how it is computed changes: every key changes with it.
CACHE_FORMAT_VERSION = 1

_INDEX_NAME = "index.json"
# A shard is written once it holds this many bytes: progress survives a crash, files stay manageable.
_SHARD_BYTES = 256 * 1024 * 1024
# Elements sampled (evenly strided) from each weight tensor for the model fingerprint: a fine-tune or
# another checkpoint changes them, and the cost does not grow with the tensor's size.
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
    if backend is None:
        vocabulary = tokenizer.get_vocab()
    else:
        vocabulary = json.loads(backend.to_str())
        # Calling a transformers 5.23 fast tokenizer with padding/truncation stores those settings in
        # its backend; encode_prompt always passes them, so they say nothing about the cached tensors.
        vocabulary.pop("padding", None)
        vocabulary.pop("truncation", None)
    settings = {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
    }
    return _canonical_json({**settings, "vocabulary": vocabulary})


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
    masked_loss: bool = False,
    max_caption_tokens: int = WINDOW_TOKENS,
) -> SDXLDataset:
    """The training dataset for `samples` cropped by `plans` (one plan per sample).

    `caption_options` holds `prefix` (the run's trigger word, for samples without a prefix of their own:
    `caption_prefix_of`), `shuffle_tags`, `keep_tags` and `dropout` (missing keys: off).
    With `cache=True` every entry not yet cached is encoded before this returns, on the device the
    encoders are on (inputs go to `device`); see the module docstring for what items hold. The dataset
    keeps no reference to `components`, so the recipe can free the encoders it no longer needs.
    With `masked_loss`, items also hold `mask` ((1, h, w) at latent resolution; see `latent_mask`).
    Captions are encoded to `max_caption_tokens` (`encode_prompt`), which keys their text entries.
    """
    if len(samples) != len(plans):
        raise ValueError(f"{len(samples)} samples but {len(plans)} crop plans")
    if cache and not model_fingerprint:
        raise ValueError("caching needs the model fingerprint (see model_fingerprint)")
    settings = _SampleSettings(
        caption_options=dict(caption_options),
        background=tuple(background),
        max_image_pixels=max_image_pixels,
        random_flip=random_flip,
        seed=seed,
        mask_scale=vae_scale_factor(components) if masked_loss else None,
    )
    items = [_Item(sample, plan, _time_ids(plan)) for sample, plan in zip(samples, plans, strict=True)]
    if not cache:
        return SDXLDataset(items, settings, cached=None)

    store = ShardStore(Path(cache_dir) / model_fingerprint[:16], model_fingerprint)
    flips = (False, True) if random_flip else (False,)
    latent_keys = [
        _latent_keys(item, flips, settings.background, model_fingerprint, masked_loss) for item in items
    ]
    text_per_step = bool(caption_options.get("shuffle_tags")) or caption_options.get("dropout", 0.0) > 0
    trigger = caption_options.get("prefix", "")
    cache_captions = [] if text_per_step else [_caption_at_cache_time(i.sample, trigger) for i in items]
    text_keys = [_text_key(caption, model_fingerprint, max_caption_tokens) for caption in cache_captions]

    # The main process encodes first; the others then find every entry cached and only read.
    in_order = accelerator.main_process_first() if accelerator is not None else nullcontext()
    with in_order, store.locked():
        store.reload()
        missing_latents = {
            keys[flip]: (item, flip)
            for item, keys in zip(items, latent_keys, strict=True)
            for flip in flips
            if keys[flip] not in store
        }
        missing_captions = {
            key: caption for key, caption in zip(text_keys, cache_captions, strict=True) if key not in store
        }
        show_progress = accelerator is None or accelerator.is_main_process
        with store.writer() as writer:
            _cache_latents(writer, components, missing_latents, settings, device, batch_size, show_progress)
            _cache_text(
                writer, components, missing_captions, device, batch_size, show_progress, max_caption_tokens
            )
    cached = [
        _CachedRefs(
            latents={flip: store.location(key) for flip, key in keys.items()},
            text=store.location(text_keys[index]) if text_keys else None,
        )
        for index, keys in enumerate(latent_keys)
    ]
    return SDXLDataset(items, settings, cached=cached)


def _time_ids(plan: CropPlan) -> torch.Tensor:
    return compute_time_ids(plan.original_size, plan.crop_top_left, plan.target_size)


def _caption_at_cache_time(sample: CaptionedImage, trigger: str) -> str:
    # Only the prefix applies: the rng is never drawn from without shuffling or dropout.
    return transform_caption(sample.caption, prefix=caption_prefix_of(sample, trigger), rng=random.Random(0))


def _latent_keys(
    item: _Item, flips: Sequence[bool], background: tuple[int, int, int], fingerprint: str, masked: bool
) -> dict[bool, str]:
    plan = item.plan
    image = _content_hash(item.sample)
    # Only an entry that holds a mask names one: an image without a mask shares the unmasked entry.
    mask = {"mask": _mask_hash(item.sample)} if masked and item.sample.mask is not None else {}
    return {
        flip: _entry_key(
            kind="latents",
            model=fingerprint,
            image=image,
            bucket=plan.bucket,
            resized=plan.resized,
            crop_top_left=plan.crop_top_left,
            original_size=plan.original_size,
            flip=flip,
            background=background,
            **mask,
        )
        for flip in flips
    }


def _text_key(caption: str, fingerprint: str, max_caption_tokens: int) -> str:
    # One window keeps the key it had before long captions existed, so existing caches stay valid.
    tokens = {} if max_caption_tokens == WINDOW_TOKENS else {"max_caption_tokens": max_caption_tokens}
    return _entry_key(kind="text", model=fingerprint, caption=caption, **tokens)


def _entry_key(**inputs: Any) -> str:
    inputs["format_version"] = CACHE_FORMAT_VERSION
    return hashlib.sha256(_canonical_json(inputs).encode()).hexdigest()


def _content_hash(sample: CaptionedImage) -> str:
    """sha256 of the encoded image: the file's bytes, or the bytes a dataset row holds."""
    image = sample.image if isinstance(sample.image, Path) else sample.image.read()
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    digest = hashlib.sha256()
    try:
        with open(image, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError as error:
        raise DataError(
            f"{image}: cannot read the image ({error.strerror}) (sample {sample.source})",
            hint="restore the file, or remove the sample from the dataset",
        ) from error
    return digest.hexdigest()


def _mask_hash(sample: CaptionedImage) -> str:
    """sha256 of the mask file's bytes; `alpha` for an alpha-channel mask (in the image's own hash)."""
    if not isinstance(sample.mask, Path):
        return str(sample.mask)
    return _content_hash(CaptionedImage(image=sample.mask, caption="", source=str(sample.mask)))


def vae_scale_factor(components: SDXLComponents) -> int:
    """Pixels per latent along each side (8 for SDXL's VAE), as diffusers' pipelines compute it."""
    return 2 ** (len(components.vae.config.block_out_channels) - 1)


def latent_mask(
    sample: CaptionedImage, plan: CropPlan, flip: bool, scale: int, max_pixels: int
) -> torch.Tensor:
    """The (1, h, w) float mask of one training image at latent resolution (h, w = bucket // scale).

    The mask goes through the image's own resize, flip and crop (`apply_crop` with its plan), so each
    mask pixel stays on its image pixel; then each latent takes the mean of the `scale` x `scale`
    pixels it encodes (area averaging). A sample without a mask gets ones (every pixel trains).
    """
    size = (plan.bucket[1] // scale, plan.bucket[0] // scale)
    if sample.mask is None:
        return torch.ones((1, *size))
    pixels = apply_crop(load_mask(sample, max_pixels), plan, flip=flip)
    mask = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)
    return F.interpolate(mask[None, None], size=size, mode="area")[0]


def _cache_latents(
    writer: _ShardWriter,
    components: SDXLComponents,
    missing: dict[str, tuple[_Item, bool]],
    settings: _SampleSettings,
    device: torch.device,
    batch_size: int,
    show_progress: bool,
) -> None:
    by_bucket: dict[tuple[int, int], list[tuple[str, _Item, bool]]] = defaultdict(list)
    for key, (item, flip) in missing.items():
        by_bucket[item.plan.bucket].append((key, item, flip))
    with tqdm(total=len(missing), desc="caching latents", unit="image", disable=not show_progress) as bar:
        for jobs in by_bucket.values():
            for batch in _chunks(jobs, batch_size):
                pixels = torch.stack([_pixel_values(item, flip, settings) for _, item, flip in batch]).to(
                    device
                )
                with torch.no_grad():
                    latents = encode_latents(components, pixels)
                for (key, item, flip), latent in zip(batch, latents, strict=True):
                    tensors = {"latents": latent}
                    if settings.mask_scale is not None and item.sample.mask is not None:
                        tensors["mask"] = _item_mask(item, flip, settings)
                    writer.add(key, tensors)
                bar.update(len(batch))


def _cache_text(
    writer: _ShardWriter,
    components: SDXLComponents,
    missing: dict[str, str],
    device: torch.device,
    batch_size: int,
    show_progress: bool,
    max_caption_tokens: int,
) -> None:
    jobs = list(missing.items())
    with tqdm(total=len(jobs), desc="caching captions", unit="caption", disable=not show_progress) as bar:
        for batch in _chunks(jobs, batch_size):
            with torch.no_grad():
                captions = [caption for _, caption in batch]
                prompt_embeds, pooled = encode_prompt(components, captions, device, max_caption_tokens)
            for (key, _), embeds, pooled_embeds in zip(batch, prompt_embeds, pooled, strict=True):
                writer.add(key, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled_embeds})
            bar.update(len(batch))


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _pixel_values(item: _Item, flip: bool, settings: _SampleSettings) -> torch.Tensor:
    image = item.sample.load(settings.background, settings.max_image_pixels)
    return _to_model_range(apply_crop(image, item.plan, flip=flip))


def _item_mask(item: _Item, flip: bool, settings: _SampleSettings) -> torch.Tensor:
    assert settings.mask_scale is not None
    return latent_mask(item.sample, item.plan, flip, settings.mask_scale, settings.max_image_pixels)


def _to_model_range(image: Image.Image) -> torch.Tensor:
    """CHW float32 in [-1, 1] from an 8-bit RGB image, as the VAE expects."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ShardStore:
    """Cached tensors for one model fingerprint: safetensors shards, and an index of entry key -> shard.

    Use under `locked()`: `reload()` reads the index and keeps only entries whose shard holds them.
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self._entries: dict[str, str] = {}

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's file lock: one process at a time reads-then-writes the index."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / ".lock")):
            yield

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def location(self, key: str) -> tuple[str, str]:
        """(shard file, key) of a cached entry."""
        return str(self.folder / self._entries[key]), key

    def reload(self) -> None:
        # Under the lock no other process is writing, so temporary files are leftovers of a crash.
        for leftover in self.folder.glob(f"*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        self._entries = {}
        index = self._read_index()
        by_shard: dict[str, list[str]] = defaultdict(list)
        for key, shard in index.items():
            by_shard[shard].append(key)
        for shard, keys in by_shard.items():
            stored = self._keys_in_shard(shard)
            self._entries.update((key, shard) for key in keys if key in stored)

    def _read_index(self) -> dict[str, str]:
        path = self.folder / _INDEX_NAME
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("ignoring the unreadable cache index %s (%s): re-encoding", path, error)
            return {}
        if index.get("format_version") != CACHE_FORMAT_VERSION or index.get("model_fingerprint") != (
            self.fingerprint
        ):
            return {}
        return dict(index.get("entries", {}))

    def _keys_in_shard(self, shard: str) -> set[str]:
        try:
            with safe_open(str(self.folder / shard), framework="pt") as handle:
                return {name.rsplit(".", 1)[0] for name in handle.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError) as error:
            logger.warning("ignoring the unreadable cache shard %s (%s): re-encoding", shard, error)
            return set()

    @contextmanager
    def writer(self) -> Iterator[_ShardWriter]:
        """A writer that adds entries; whatever was added is saved on exit, even when encoding fails."""
        writer = _ShardWriter(self)
        try:
            yield writer
        finally:
            writer.flush()

    def _commit(self, tensors: dict[str, torch.Tensor], keys: list[str]) -> None:
        numbers = [int(path.stem.split("-")[1]) for path in self.folder.glob("shard-*.safetensors")]
        shard = f"shard-{max(numbers, default=-1) + 1:05d}.safetensors"
        # The shard is in place before the index names it: a crash in between leaves an unused file.
        write_atomically(self.folder / shard, lambda path: save_file(tensors, str(path)))
        self._entries.update((key, shard) for key in keys)
        index = {
            "format_version": CACHE_FORMAT_VERSION,
            "model_fingerprint": self.fingerprint,
            "entries": self._entries,
        }
        text = json.dumps(index, indent=0, sort_keys=True)
        write_atomically(self.folder / _INDEX_NAME, lambda path: path.write_text(text, encoding="utf-8"))


class _ShardWriter:
    def __init__(self, store: ShardStore) -> None:
        self._store = store
        self._tensors: dict[str, torch.Tensor] = {}
        self._keys: list[str] = []
        self._bytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            # A copy: a row of a batch shares the batch's storage, which safetensors refuses to save.
            stored = tensor.detach().to("cpu", copy=True).contiguous()
            self._tensors[f"{key}.{name}"] = stored
            self._bytes += stored.numel() * stored.element_size()
        self._keys.append(key)
        if self._bytes >= _SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            self._store._commit(self._tensors, self._keys)
        self._tensors, self._keys, self._bytes = {}, [], 0


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
    # Pixels per latent side when items carry a loss mask (data.masked_loss), else None.
    mask_scale: int | None = None


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
    `source`. Both: `prior` (a 0-d bool tensor: a regularisation image, whose loss is the prior loss),
    and with masked loss `mask` ((1, h, w) float at latent resolution, 1 = trained, 0 = ignored).
    """

    def __init__(self, items: list[_Item], settings: _SampleSettings, cached: list[_CachedRefs] | None):
        self._items = items
        self._settings = settings
        self._cached = cached
        # Open shards, per process: safe_open maps the file and parses its header once.
        self._open_shards: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, key: int) -> dict[str, Any]:
        """Item `key`, its flip and caption transforms drawn for the key's epoch (see `SampleKey`)."""
        index = range(len(self._items))[key]  # dataset[-1] draws what dataset[len - 1] draws
        item = self._items[index]
        settings = self._settings
        rng = random.Random(f"{settings.seed}:{index}:{epoch_of(key)}")
        flip = settings.random_flip and rng.random() < 0.5
        result: dict[str, Any] = {}
        if self._cached is None:
            result["pixel_values"] = _pixel_values(item, flip, settings)
        else:
            refs = self._cached[index]
            result["latents"] = self._read(*refs.latents[flip], "latents")
            if settings.mask_scale is not None and item.sample.mask is not None:
                result["mask"] = self._read(*refs.latents[flip], "mask")
            if refs.text is not None:
                for name in _TEXT_TENSORS:
                    result[name] = self._read(*refs.text, name)
        if self._cached is None or self._cached[index].text is None:
            options = settings.caption_options
            result["caption"] = transform_caption(
                item.sample.caption,
                prefix=caption_prefix_of(item.sample, options.get("prefix", "")),
                shuffle_tags=bool(options.get("shuffle_tags", False)),
                keep_tags=int(options.get("keep_tags", 0)),
                dropout=float(options.get("dropout", 0.0)),
                rng=rng,
            )
        result["time_ids"] = item.time_ids.clone()
        result["source"] = item.sample.source
        result["prior"] = torch.tensor(item.sample.prior)
        if settings.mask_scale is not None and "mask" not in result:
            result["mask"] = _item_mask(item, flip, settings)
        return result

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
