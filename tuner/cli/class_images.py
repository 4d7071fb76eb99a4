"""`tuner generate-class-images`: regularisation (prior-preservation) images rendered by the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options


def generate_class_images_command(
    model: Annotated[str, typer.Option("--model", help="The base model: hub ID, local folder; `tiny`.")],
    class_prompt: Annotated[
        str, typer.Option("--class-prompt", help='The class, e.g. "a photo of a dog" (also each caption).')
    ],
    count: Annotated[int, typer.Option("--count", help="Images the folder should hold.")],
    out: Annotated[Path, typer.Option("--out", help="Folder of class-NNNNN.png + .txt (then --reg-data).")],
    resolution: Annotated[int, typer.Option("--resolution", help="Square side in px.")] = 1024,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 30,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 5.0,
    seed: Annotated[
        int, typer.Option("--seed", help="Image n is drawn from (seed, n): a rerun draws it again.")
    ] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per pipeline call.")] = 1,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to avoid.")] = None,
    device: options.Device = None,
    mixed_precision: options.MixedPrecision = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Render class images with the base SDXL model for prior preservation (--reg-data).

    Resumable: images already in --out are kept and only the missing ones are rendered; nothing is
    done when --out already holds --count images or more.
    """
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.models.sdxl_class_images import ClassImageSettings, generate_class_images
    from tuner.runtime.stack import check_stack

    check_stack()
    result = generate_class_images(
        model,
        ClassImageSettings(
            prompt=class_prompt,
            count=count,
            resolution=resolution,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            batch_size=batch_size,
            negative_prompt=negative_prompt,
        ),
        out,
        device=device or "auto",
        mixed_precision=mixed_precision or "auto",
        source=hub or "huggingface",
        offline=bool(offline),
    )
    if not result.written:
        print(f"{out} already holds {result.held_before} images (--count {count}): nothing to generate")
    else:
        total = result.held_before + len(result.written)
        print(f"wrote {len(result.written)} class images to {out} ({total} images there now)")
