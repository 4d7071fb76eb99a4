"""`tuner eval sdxl`: a fixed prompt x seed grid for the base model and each adapter, side by side.

Every model draws the same prompts with the same seeds (the noise is drawn on the CPU, so it is the
same on every device), one comparison image per prompt: models in columns, seeds in rows. With a CLIP
model each image gets a CLIP score, 100 * max(cos(image, prompt), 0) as in Hessel et al. 2021 (and
torchmetrics' CLIPScore), and each model the mean of its images' scores.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image, ImageDraw

from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.errors import ConfigError, DataError, ModelError
from tuner.models.sdxl import load_sdxl
from tuner.models.sdxl_infer import (
    Adapter,
    GenerationSettings,
    generate,
    load_adapters,
    resolve_sdxl_model,
    trained_scheduler,
)
from tuner.models.sdxl_sampling import build_pipeline
from tuner.runtime.device import Runtime

EVAL_FILE = "eval.json"
LABEL_HEIGHT = 16

ClipScorer = Callable[[Sequence[Image.Image], str], list[float]]


@dataclass
class SdxlEvalSettings:
    prompts: list[str]
    seeds: list[int]  # consecutive: `generate` draws seed, seed + 1, ...
    steps: int = 30
    guidance: float = 5.0
    size: tuple[int, int] = (1024, 1024)
    negative_prompt: str | None = None


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with `#` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read the prompts file {path}: {error}", hint="pass a UTF-8 text file"
        ) from error
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"{path} holds no prompt", hint="write one prompt per line")
    return prompts


def recorded_base_model(adapter: str | Path) -> str | None:
    """model.name_or_path from the `tuner_config.yaml` beside an adapter (its folder or file), or None."""
    folder = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
    config_file = folder / RESOLVED_CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        model = ((yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model") or {}).get(
            "name_or_path"
        )
    except (OSError, yaml.YAMLError):
        return None
    return str(model) if model else None


def clip_scorer(
    clip_model: str, device: torch.device, source: str = "huggingface", offline: bool = False
) -> ClipScorer:
    """A function scoring images against one prompt with the CLIP model at `clip_model` (folder, hub ID, or
    `tiny-clip`: the tiny random one tests use)."""
    from transformers import CLIPModel, CLIPProcessor

    from tuner.runtime.hub import resolve_model_source
    from tuner.tiny import build_tiny

    path = (
        str(build_tiny("clip"))
        if clip_model == "tiny-clip"
        else resolve_model_source(clip_model, source, offline)
    )
    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the CLIP model {clip_model}: {error}",
            hint="pass a CLIP folder or hub ID, e.g. openai/clip-vit-large-patch14",
        ) from error

    def score(images: Sequence[Image.Image], prompt: str) -> list[float]:
        inputs = processor(
            text=[prompt], images=list(images), return_tensors="pt", padding=True, truncation=True
        )
        with torch.inference_mode():
            output = model(**inputs.to(device))
        # CLIPModel returns unit-length projected embeddings, so their product is the cosine.
        cosine = (output.image_embeds @ output.text_embeds.T)[:, 0]
        return [100.0 * max(value, 0.0) for value in cosine.float().tolist()]

    return score


def evaluate_sdxl(
    settings: SdxlEvalSettings,
    out: str | Path,
    runtime: Runtime,
    adapters: Sequence[Adapter] = (),
    model: str | None = None,
    *,
    clip: ClipScorer | None = None,
    source: str = "huggingface",
    offline: bool = False,
) -> dict[str, Any]:
    """Draw the grid for the base model and each adapter; write a comparison PNG per prompt and eval.json."""
    if model is None:
        model = next((m for m in (recorded_base_model(a.path) for a in adapters) if m), None)
        if model is None:
            raise ConfigError("no model given and no adapter records one", hint="pass --model (or tiny)")
    components = load_sdxl(resolve_sdxl_model(model, source, offline), weight_dtype=runtime.compute_dtype)
    # The base model's own scheduler; each adapter's column samples with the one it was trained for.
    pipeline = build_pipeline(components).to(runtime.device_type)
    schedulers = [pipeline.scheduler, *(trained_scheduler(components, [adapter]) for adapter in adapters)]
    names = load_adapters(pipeline, list(adapters))
    columns = ["base", *(_adapter_label(adapter, adapters) for adapter in adapters)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = [{"name": n, "adapter": None, "images": []} for n in columns]
    for index, adapter in enumerate(adapters):
        results[index + 1]["adapter"] = str(adapter.path)
    for prompt_index, prompt in enumerate(settings.prompts):
        drawn = []
        for column in range(len(columns)):
            _activate(pipeline, names, adapters, column - 1)
            pipeline.scheduler = schedulers[column]
            images = generate(pipeline, components, _generation(settings, prompt, model))
            scores = clip(images, prompt) if clip is not None else [None] * len(images)
            drawn.append(images)
            for seed, value in zip(settings.seeds, scores, strict=True):
                results[column]["images"].append({"prompt": prompt_index, "seed": seed, "clip_score": value})
        file = out / f"prompt-{prompt_index:02d}.png"
        comparison_grid(columns, drawn, settings.seeds).save(file)
        print(f"wrote {file}")
    for result in results:
        scores = [image["clip_score"] for image in result["images"] if image["clip_score"] is not None]
        result["clip_score"] = sum(scores) / len(scores) if scores else None
    report = {
        "model": model,
        "prompts": settings.prompts,
        "seeds": settings.seeds,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "size": list(settings.size),
        "models": results,
    }
    (out / EVAL_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def _activate(pipeline, names: list[str], adapters: Sequence[Adapter], index: int) -> None:
    """Only adapter `index` on, at its scale; index -1: every adapter off (the base model)."""
    if not names:
        return
    if index < 0:
        pipeline.disable_lora()
        return
    pipeline.enable_lora()
    pipeline.set_adapters([names[index]], adapter_weights=[adapters[index].scale])


def _generation(settings: SdxlEvalSettings, prompt: str, model: str) -> GenerationSettings:
    return GenerationSettings(
        prompt=prompt,
        negative_prompt=settings.negative_prompt,
        steps=settings.steps,
        guidance=settings.guidance,
        size=settings.size,
        seed=settings.seeds[0],
        num_images=len(settings.seeds),
        model=model,
    )


def _adapter_label(adapter: Adapter, adapters: Sequence[Adapter]) -> str:
    """The adapter folder's name (a file's own name unless it has diffusers' standard one), or the whole
    path where two adapters would share a label."""
    labels = [_short_label(Path(a.path)) for a in adapters]
    label = _short_label(Path(adapter.path))
    return label if labels.count(label) == 1 else str(adapter.path)


def _short_label(path: Path) -> str:
    if path.is_dir() or path.stem != "pytorch_lora_weights":
        return path.stem if path.is_file() else path.name
    return path.parent.name


def comparison_grid(labels: list[str], columns: list[list[Image.Image]], seeds: list[int]) -> Image.Image:
    """Models in columns under their labels, one row per seed."""
    width, height = columns[0][0].size
    canvas = Image.new("RGB", (len(columns) * width, LABEL_HEIGHT + len(seeds) * height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (label, images) in enumerate(zip(labels, columns, strict=True)):
        draw.text((column * width + 2, 2), label[: max(width // 6, 4)], fill="black")
        for row, image in enumerate(images):
            canvas.paste(image, (column * width, LABEL_HEIGHT + row * height))
    return canvas


def format_summary(report: dict[str, Any]) -> str:
    lines = [f"{len(report['prompts'])} prompt(s) x {len(report['seeds'])} seed(s), model {report['model']}"]
    for result in report["models"]:
        score = result["clip_score"]
        lines.append(f"  {result['name']:<24} CLIP score {'-' if score is None else f'{score:.2f}'}")
    return "\n".join(lines)
