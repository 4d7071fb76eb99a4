"""Qwen2.5-VL-shaped LoRA training: length-grouped against plain random batching, on a mixed data set.

`small` is a Qwen2.5-VL with every width and depth cut down (CPU); `full` is the real 3B architecture
(Qwen2.5-VL-3B-Instruct's config values) with random weights (GPU). The tokenizer, processor and chat
template come from the tiny Qwen2.5-VL model.
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from transformers import AutoConfig, AutoProcessor, PretrainedConfig, Qwen2_5_VLForConditionalGeneration

from tuner.bench.measure import PeakMemory, RunFigures, StepClock, TimedLoss
from tuner.bench.profiling import profiler_for
from tuner.bench.rounds import Trainer
from tuner.config.schema import RunConfig
from tuner.data.vl_encoding import samples_in_batch
from tuner.tiny import build_tiny
from tuner.tiny.datasets import draw_shape

WARMUP_STEPS = 2
_TEXT = {
    "small": {
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "full": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
}
# mrope_section splits half of a head (64 of 128 in the real model; 32 of 64 here).
_MROPE = {"small": [8, 12, 12], "full": [16, 24, 24]}
_VISION = {
    "small": {
        "depth": 4,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_heads": 4,
        "out_hidden_size": 256,
        "fullatt_block_indexes": [1, 3],
    },
    "full": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
# (width, height) of the images in the set: thumbnails to a large photo, as in real instruction data.
IMAGE_SIZES = ((112, 112), (224, 168), (336, 336), (448, 252), (560, 448))
ANSWER_WORDS = (2, 8, 30, 90)


@dataclass(frozen=True)
class QwenVLBenchSettings:
    scale: str
    device: str
    steps: int
    batch_size: int
    conversations: int
    seed: int = 0
    gradient_checkpointing: bool = False
    packing: bool = False
    profile_dir: Path | None = None  # profile each trainer's steps after warm-up into this folder

    @property
    def mixed_precision(self) -> str:
        return "no" if self.device == "cpu" else "bf16"


def build_qwenvl_model(scale: str, folder: Path, seed: int = 0) -> Path:
    """A Qwen2.5-VL of `scale` with random weights, with the tiny model's processor (once)."""
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    config = qwenvl_config(scale)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.to(torch.bfloat16 if scale == "full" else torch.float32).save_pretrained(folder)
    AutoProcessor.from_pretrained(build_tiny("qwen2.5-vl")).save_pretrained(folder)
    (folder / ".complete").touch()
    return folder


def qwenvl_config(scale: str) -> PretrainedConfig:
    """The Qwen2.5-VL config at `scale` (the rest from the tiny Qwen2.5-VL)."""
    config = AutoConfig.from_pretrained(build_tiny("qwen2.5-vl"))
    config.text_config.update(_TEXT[scale])
    config.text_config.rope_parameters = {
        **config.text_config.rope_parameters,
        "mrope_section": _MROPE[scale],
    }
    config.text_config.initializer_range = 0.02
    # Derived from the layer count when a config is built; a changed count needs a new list.
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    config.vision_config.update(_VISION[scale])
    if scale == "full":
        # Qwen2.5-VL-3B shares its input embedding with the LM head (the 7B does not): 311 M parameters.
        config.tie_word_embeddings = True
    return config


def write_conversations(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` one-image question/answer records; image sizes and answer lengths drawn from a fixed mix."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    for width, height in IMAGE_SIZES:
        draw_shape((200, 60, 60), "circle", width, height).save(folder / "images" / f"{width}x{height}.png")
    words = ("red", "circle", "left", "large", "small", "over", "under", "shape", "colour", "plain")
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(count):
            width, height = rng.choice(IMAGE_SIZES)
            answer = " ".join(rng.choice(words) for _ in range(rng.choice(ANSWER_WORDS)))
            record = {
                "messages": [
                    {"role": "user", "content": "<image>Describe the picture."},
                    {"role": "assistant", "content": answer.capitalize() + "."},
                ],
                "images": [f"images/{width}x{height}.png"],
            }
            handle.write(json.dumps(record) + "\n")
    return folder / "train.jsonl"


@dataclass(frozen=True)
class BatchingVariant:
    name: str
    grouped: bool
    packing: bool = False
    checkpointing: bool = False


def qwenvl_trainers(settings: QwenVLBenchSettings, work_dir: Path) -> list[Trainer]:
    """Plain random batching (the reference), length-grouped, and (if asked) packed and checkpointed."""
    model_dir = build_qwenvl_model(settings.scale, work_dir / f"qwen2.5-vl-{settings.scale}")
    data = write_conversations(work_dir / f"conversations-{settings.conversations}", settings.conversations)
    variants = [
        BatchingVariant("plain random batching", grouped=False),
        BatchingVariant("ours: length-grouped batching", grouped=True),
    ]
    if settings.packing:
        variants.append(BatchingVariant("ours: packed, random order", grouped=False, packing=True))
    if settings.gradient_checkpointing:
        variants.append(
            BatchingVariant("ours: length-grouped + gradient checkpointing", grouped=True, checkpointing=True)
        )
    return [functools.partial(train_qwenvl, settings, model_dir, data, variant) for variant in variants]


def train_qwenvl(
    settings: QwenVLBenchSettings, model_dir: Path, data: Path, variant: BatchingVariant
) -> RunFigures:
    from tuner.recipes import qwenvl as recipe

    device = torch.device(settings.device)
    profiler = profiler_for(settings.profile_dir, variant.name, device, WARMUP_STEPS)
    first_timed_step = profiler.end if profiler else WARMUP_STEPS
    clock = StepClock()
    step_tokens: list[tuple[int, int, int]] = []  # (computed, real, supervised) per step

    def count(batch: dict) -> int:
        computed = batch["input_ids"].numel()
        # A packed batch has no padding and no attention mask.
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else computed
        step_tokens.append((computed, real, int((batch["labels"] != -100).sum())))
        return samples_in_batch(batch)

    timed = TimedLoss(clock, recipe.causal_lm_loss, count, profiler=profiler)
    with tempfile.TemporaryDirectory(prefix="bench-qwenvl-") as output, PeakMemory(device) as memory:
        config = RunConfig.model_validate(
            {
                "task": "qwenvl-lora",
                "model": {"name_or_path": str(model_dir)},
                "data": {
                    "path": str(data),
                    "group_by_length": variant.grouped,
                    "packing": variant.packing,
                    "max_pixels": 560 * 448,
                },
                "train": {
                    "batch_size": settings.batch_size,
                    "max_steps": settings.steps,
                    "seed": settings.seed,
                    "gradient_checkpointing": variant.checkpointing,
                },
                "output": {"dir": output, "log_every": settings.steps},
                "runtime": {"device": settings.device, "mixed_precision": settings.mixed_precision},
            }
        )
        with (
            mock.patch.object(recipe, "causal_lm_loss", timed),
            mock.patch.object(recipe, "SAMPLE_PROMPTS", 0),
        ):
            recipe.train_qwenvl_lora(config)
        timed.finish()
    # Tokens of the timed steps only: after warm-up, and not the last step (it has no end time).
    seconds = clock.step_seconds(first_timed_step)
    timed_tokens = step_tokens[first_timed_step : first_timed_step + len(seconds)]
    padded, real, supervised = (sum(column) for column in zip(*timed_tokens, strict=True))
    steps_per_s, samples_per_s = clock.rates(first_timed_step)
    return RunFigures(
        name=variant.name,
        steps_per_s=steps_per_s,
        samples_per_s=samples_per_s,
        time_to_first_step_s=clock.time_to_first_step(),
        peak_memory_mb=memory.peak_mb,
        memory_kind=memory.kind,
        extra={
            "tokens/s": real / sum(seconds),
            "supervised tokens/s": supervised / sum(seconds),
            "padding fraction": 1 - real / padded,
        },
    )
