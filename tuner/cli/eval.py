"""`tuner eval <family>`: is the adapter better than the base model? One command per model family."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options

eval_app = typer.Typer(help="Score base models and LoRA adapters side by side.", no_args_is_help=True)


@eval_app.command("qwenvl")
def eval_qwenvl_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="Eval conversations (training format); the last answer is the reference."
        ),
    ],
    adapter: Annotated[
        list[Path] | None, typer.Option("--adapter", help="A tuner/PEFT adapter folder (repeatable).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Base model: hub ID, folder or `tiny` (default: the first adapter's)."),
    ] = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Score only the adapters.")] = False,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="exact_match, normalised_match, anls, choice_accuracy, box_iou, box_accuracy, rouge_l, "
            "bleu (repeatable; default: chosen per sample from its reference).",
        ),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option("--image-root", help="Folder --data image paths are relative to.")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for eval.json and the answers of each model.")
    ] = Path("eval"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts answered at once.")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest answer in tokens.")] = 64,
    max_pixels: Annotated[
        int | None,
        typer.Option("--max-pixels", help="Upper bound of pixels per image (default: training's)."),
    ] = None,
    allow_overlap: Annotated[
        bool,
        typer.Option(
            "--allow-overlap", help="Score samples that are also in an adapter's training data (warns)."
        ),
    ] = False,
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
    """Answer every sample greedily with the base model and each adapter; score, compare, list the worst."""
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.eval.qwenvl import evaluate_qwenvl, format_table, write_report
    from tuner.runtime import resolve_runtime
    from tuner.runtime.stack import check_stack

    check_stack()
    report = evaluate_qwenvl(
        data,
        resolve_runtime(device or "auto", mixed_precision or "auto"),
        adapter or [],
        model,
        include_base=not no_base,
        image_root=image_root,
        metrics=metric,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_pixels=max_pixels,
        allow_overlap=allow_overlap,
        load_options={
            "trust_remote_code": bool(trust_remote_code),
            "allow_pickle": bool(allow_pickle),
            "hub_source": hub or "huggingface",
            "offline": bool(offline),
        },
    )
    print(format_table(report))
    print(f"\nwrote {write_report(report, out)}")


@eval_app.command("sdxl")
def eval_sdxl_command(
    prompts: Annotated[Path, typer.Option("--prompts", help="A text file, one prompt per line.")],
    adapter: Annotated[
        list[Path] | None,
        typer.Option("--adapter", help="LoRA folder or file (repeatable, one column each)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Hub ID, folder or checkpoint; `tiny` (default: the adapter's base)."),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Images per prompt and model (rows).")] = 2,
    seed: Annotated[int, typer.Option("--seed", help="The first seed (the next use seed+1...).")] = 0,
    steps: Annotated[int, typer.Option("--steps", help="Denoising steps.")] = 30,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 5.0,
    size: Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT in px.")] = "1024x1024",
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="What to avoid.")] = None,
    clip_model: Annotated[
        str | None,
        typer.Option("--clip-model", help="CLIP folder or hub ID: adds a CLIP score per image and model."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Folder for prompt-NN.png comparisons and eval.json.")
    ] = Path("eval"),
    device: options.Device = None,
    mixed_precision: options.MixedPrecision = None,
    offline: options.Offline = None,
    hub: options.Hub = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Draw every prompt with every seed for the base model and each adapter, in one image per prompt."""
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.cli.infer import _parse_size
    from tuner.eval.sdxl import SdxlEvalSettings, clip_scorer, evaluate_sdxl, format_summary, read_prompts
    from tuner.models.sdxl_infer import Adapter
    from tuner.runtime import resolve_runtime
    from tuner.runtime.stack import check_stack

    check_stack()
    settings = SdxlEvalSettings(
        prompts=read_prompts(prompts),
        seeds=list(range(seed, seed + seeds)),
        steps=steps,
        guidance=guidance,
        size=_parse_size(size),
        negative_prompt=negative_prompt,
    )
    runtime = resolve_runtime(device or "auto", mixed_precision or "auto")
    source = hub or "huggingface"
    clip = None
    if clip_model is not None:
        import torch

        clip = clip_scorer(clip_model, torch.device(runtime.device_type), source, bool(offline))
    report = evaluate_sdxl(
        settings,
        out,
        runtime,
        [Adapter(path) for path in adapter or []],
        model,
        clip=clip,
        source=source,
        offline=bool(offline),
    )
    print(format_summary(report))
    print(f"wrote {out / 'eval.json'}")
