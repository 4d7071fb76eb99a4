"""`tuner infer <family>`: generate with a base model and adapters. One command per model family."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options

infer_app = typer.Typer(help="Generate with a base model and LoRA adapters.", no_args_is_help=True)


def _parse_size(size: str) -> tuple[int, int]:
    from tuner.errors import ConfigError

    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise ConfigError(f"--size {size!r} is not WIDTHxHEIGHT", hint="e.g. --size 1024x1024")
    return int(width), int(height)


@infer_app.command("sdxl")
def infer_sdxl_command(
    model: Annotated[str, typer.Option("--model", help="Hub ID, local folder or checkpoint; `tiny`.")],
    prompt: Annotated[str, typer.Option("--prompt", help="What to draw.")],
    adapter: Annotated[
        list[Path] | None, typer.Option("--adapter", help="LoRA folder or file (repeatable, stacked).")
    ] = None,
    adapter_scale: Annotated[
        list[float] | None, typer.Option("--adapter-scale", help="Scale per --adapter, in order (default 1).")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to avoid.")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 30,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 5.0,
    size: Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT in px.")] = "1024x1024",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the first image (the next use seed+1...).")
    ] = 0,
    num_images: Annotated[int, typer.Option("--num-images", help="Images to generate (a grid too).")] = 1,
    out: Annotated[Path, typer.Option("--out", help="A .png file, or a folder.")] = Path("outputs/infer"),
    compare: Annotated[
        bool, typer.Option("--compare", help="Also render without the adapters, side by side.")
    ] = False,
    device: options.Device = None,
    mixed_precision: options.MixedPrecision = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Generate SDXL images, with LoRA adapters (tuner, diffusers or kohya files) stacked at their scales."""
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.errors import ConfigError
    from tuner.models.sdxl_infer import Adapter, GenerationSettings, infer_sdxl
    from tuner.runtime.stack import check_stack

    check_stack()

    adapters = adapter or []
    scales = adapter_scale or []
    if len(scales) > len(adapters):
        raise ConfigError("more --adapter-scale than --adapter values", hint="give one scale per adapter")
    settings = GenerationSettings(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        size=_parse_size(size),
        seed=seed,
        num_images=num_images,
        model=model,
        adapters=[
            Adapter(path, scales[index] if index < len(scales) else 1.0)
            for index, path in enumerate(adapters)
        ],
    )
    written = infer_sdxl(
        settings,
        out,
        device=device or "auto",
        mixed_precision=mixed_precision or "auto",
        compare=compare,
        source=hub or "huggingface",
        offline=bool(offline),
    )
    for path in written:
        print(f"wrote {path}")


@infer_app.command("qwenvl")
def infer_qwenvl_command(
    model: Annotated[
        str | None,
        typer.Option("--model", help="Hub ID, local folder or `tiny` (default: the adapter's base model)."),
    ] = None,
    adapter: Annotated[Path | None, typer.Option("--adapter", help="A tuner/PEFT adapter folder.")] = None,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="An image the prompt asks about (repeatable).")
    ] = None,
    video: Annotated[
        list[Path] | None,
        typer.Option(
            "--video",
            help="A video file or folder of frame images the prompt asks about (repeatable); sampled as "
            "training samples it (2 frames per second by default).",
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="The question to answer.")] = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Answer every sample of a training-format dataset instead of --prompt."),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option("--image-root", help="Folder --data image paths are relative to.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="JSONL of question, reference and answer (with --data).")
    ] = Path("answers.jsonl"),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer in tokens.")] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0 for greedy answers, > 0 to sample.")
    ] = 0.0,
    max_pixels: Annotated[
        int | None,
        typer.Option("--max-pixels", help="Upper bound of pixels per image (default: training's)."),
    ] = None,
    draw_boxes: Annotated[
        Path | None,
        typer.Option(
            "--draw-boxes", help="Write the --image with the boxes of the answer drawn to this image file."
        ),
    ] = None,
    device: options.Device = None,
    mixed_precision: options.MixedPrecision = None,
    trust_remote_code: options.TrustRemoteCode = None,
    allow_pickle: options.AllowPickle = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Answer a question about images and videos with a Qwen-VL model and adapter, or every sample of a
    dataset."""
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.errors import ConfigError
    from tuner.models.qwenvl_infer import answer_dataset, answer_prompt, answer_with_boxes, load_answerer
    from tuner.runtime import resolve_runtime
    from tuner.runtime.stack import check_stack

    check_stack()
    if (prompt is None) == (data is None):
        raise ConfigError(
            "pass either --prompt or --data", hint="e.g. --image cat.png --prompt 'What is this?'"
        )
    if data is not None and (image or video):
        raise ConfigError(
            "--image and --video go with --prompt", hint="--data reads the images and videos of its records"
        )
    if draw_boxes is not None and (prompt is None or len(image or []) != 1 or video):
        raise ConfigError(
            "--draw-boxes needs --prompt and exactly one --image",
            hint="e.g. --image cat.png --prompt 'Locate the cat' --draw-boxes cat-boxes.png",
        )
    answerer = load_answerer(
        model,
        resolve_runtime(device or "auto", mixed_precision or "auto"),
        adapter,
        max_pixels=max_pixels,
        trust_remote_code=bool(trust_remote_code),
        allow_pickle=bool(allow_pickle),
        hub_source=hub or "huggingface",
        offline=bool(offline),
    )
    if data is not None:
        count = answer_dataset(answerer, data, out, image_root, max_new_tokens, temperature)
        print(f"wrote {count} answers to {out}")
    elif draw_boxes is not None:
        answer, boxes = answer_with_boxes(
            answerer, prompt or "", (image or [])[0], draw_boxes, max_new_tokens, temperature
        )
        print(answer)
        print(f"wrote {draw_boxes} ({len(boxes)} box{'' if len(boxes) == 1 else 'es'})")
    else:
        videos = video or []
        print(answer_prompt(answerer, prompt or "", image or [], max_new_tokens, temperature, videos=videos))
