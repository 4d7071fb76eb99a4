"""SDXL: loading the pipeline's parts, and turning captions, crops and images into what the UNet is fed.

Every encoding here matches `StableDiffusionXLPipeline` (diffusers 0.42) to float rounding; the tests
hold them to it. Noise and loss live in `sdxl_loss`, LoRA setup and saving in `sdxl_lora`, sampling in
`sdxl_sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tuner.errors import ModelError

_COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Empty tensors some single-file checkpoints carry beside the weights to say how they were trained, read
# as ComfyUI reads them (comfy/supported_models.py, SDXL.model_type): `v_pred` marks v-prediction (NoobAI-XL
# V-Pred and other anime fine-tunes), `ztsnr` beside it a zero-terminal-SNR noise schedule. diffusers'
# from_single_file (0.42) ignores both and would hand over SDXL base's epsilon scheduler.
V_PREDICTION_MARKER = "v_pred"
ZERO_TERMINAL_SNR_MARKER = "ztsnr"
# Caption tokens in one CLIP window (77 with BOS and EOS): what diffusers' pipeline encodes.
WINDOW_TOKENS = 75


@dataclass
class SDXLComponents:
    """The parts of an SDXL pipeline that training uses. All start frozen (`requires_grad=False`)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    # None once released: a run with every caption cached samples from prompts encoded up front.
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    # Training always noises with DDPM's forward process, whatever scheduler the model samples with.
    noise_scheduler: DDPMScheduler
    source: str
    # The marker keys of a single-file checkpoint (`v_pred`, `ztsnr`), already applied to noise_scheduler;
    # kept so a run can say why it trains the prediction type and schedule it does.
    schedule_markers: frozenset[str] = frozenset()


def load_sdxl(
    name_or_path: str,
    *,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    weight_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    vae_half_precision_safe: bool = False,
    single_file_config: str | None = None,
) -> SDXLComponents:
    """Load SDXL from a diffusers folder, a hub ID, or a single-file `.safetensors` checkpoint.

    UNet and text encoders are loaded in `weight_dtype`. The VAE stays fp32 unless
    `vae_half_precision_safe`: the stock SDXL VAE overflows to NaN in fp16. A single-file checkpoint
    needs the pipeline layout from `single_file_config` (a diffusers SDXL folder or hub ID), since the
    file itself holds only weights and offline runs cannot fetch the default one.
    """
    vae_dtype = weight_dtype if vae_half_precision_safe else torch.float32
    if name_or_path.endswith((".safetensors", ".ckpt")):
        components = _load_single_file(name_or_path, single_file_config, weight_dtype, allow_pickle)
    else:
        components = _load_folder(name_or_path, revision, variant, weight_dtype, vae_dtype, allow_pickle)
    if vae is not None:
        components.vae = _from_pretrained(
            AutoencoderKL, vae, None, revision=None, variant=None, dtype=vae_dtype, allow_pickle=allow_pickle
        )
    if components.vae.dtype != vae_dtype:
        components.vae.to(dtype=vae_dtype)
    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.requires_grad_(False)
    return components


def _load_folder(
    name_or_path: str,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    allow_pickle: bool,
) -> SDXLComponents:
    if Path(name_or_path).is_dir():
        _refuse_pickle_only(Path(name_or_path), allow_pickle)
    load = {"revision": revision, "variant": variant, "dtype": dtype, "allow_pickle": allow_pickle}
    return SDXLComponents(
        unet=_from_pretrained(UNet2DConditionModel, name_or_path, "unet", **load),
        vae=_from_pretrained(AutoencoderKL, name_or_path, "vae", **{**load, "dtype": vae_dtype}),
        text_encoder=_from_pretrained(CLIPTextModel, name_or_path, "text_encoder", **load),
        text_encoder_2=_from_pretrained(CLIPTextModelWithProjection, name_or_path, "text_encoder_2", **load),
        tokenizer=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", revision=revision),
        tokenizer_2=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", revision=revision),
        noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", revision=revision),
        source=name_or_path,
    )


def _from_pretrained(model_class, name_or_path, subfolder, *, revision, variant, dtype, allow_pickle):
    try:
        return model_class.from_pretrained(
            name_or_path,
            subfolder=subfolder,
            revision=revision,
            variant=variant,
            dtype=dtype,
            use_safetensors=not allow_pickle,
        )
    except (OSError, ValueError) as error:
        where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
        hint = (
            "check model.name_or_path (a diffusers SDXL folder, hub ID or .safetensors file), "
            "model.revision and model.variant"
        )
        if not allow_pickle and "safetensors" in str(error):
            hint += "; if the model has only pickle (.bin) weights and you trust it, pass --allow-pickle"
        raise ModelError(
            f"cannot load the SDXL {subfolder or 'model'} from {where}: {error}", hint=hint
        ) from error


def _refuse_pickle_only(folder: Path, allow_pickle: bool) -> None:
    if allow_pickle:
        return
    for name in _COMPONENT_FOLDERS:
        sub = folder / name
        if sub.is_dir() and not any(sub.glob("*.safetensors")) and any(sub.glob("*.bin")):
            raise _pickle_only_error(str(sub))


def _pickle_only_error(where: str) -> ModelError:
    return ModelError(
        f"{where} has only pickle (.bin) weights, which can run code when loaded",
        hint="use a safetensors copy of the model, or pass --allow-pickle if you trust its source",
    )


def _load_single_file(
    checkpoint: str, config: str | None, dtype: torch.dtype, allow_pickle: bool
) -> SDXLComponents:
    if checkpoint.endswith(".ckpt") and not allow_pickle:
        raise _pickle_only_error(checkpoint)
    if not Path(checkpoint).is_file():
        raise ModelError(f"checkpoint file {checkpoint} does not exist", hint="check model.name_or_path")
    try:
        pipeline = StableDiffusionXLPipeline.from_single_file(checkpoint, config=config, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the single-file SDXL checkpoint {checkpoint}: {error}",
            hint="a single-file checkpoint needs a diffusers SDXL folder or hub ID for its layout "
            "(stabilityai/stable-diffusion-xl-base-1.0 or a local copy); offline, pass a local folder",
        ) from error
    markers = read_schedule_markers(checkpoint)
    return SDXLComponents(
        unet=pipeline.unet,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        text_encoder_2=pipeline.text_encoder_2,
        tokenizer=pipeline.tokenizer,
        tokenizer_2=pipeline.tokenizer_2,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config, **marked_schedule(markers)),
        source=checkpoint,
        schedule_markers=markers,
    )


def read_schedule_markers(checkpoint: str) -> frozenset[str]:
    """The marker keys (`v_pred`, `ztsnr`) at the top level of a single-file `.safetensors` checkpoint.

    Only the key names are read. A `.ckpt` (pickle) file is not opened a second time for them.
    """
    if not checkpoint.endswith(".safetensors"):
        return frozenset()
    with safe_open(checkpoint, framework="pt") as handle:
        keys = set(handle.keys())
    return frozenset(keys & {V_PREDICTION_MARKER, ZERO_TERMINAL_SNR_MARKER})


def marked_schedule(markers: frozenset[str]) -> dict[str, object]:
    """The scheduler settings the markers stand for. `ztsnr` counts only beside `v_pred`, as in ComfyUI."""
    if V_PREDICTION_MARKER not in markers:
        return {}
    settings: dict[str, object] = {"prediction_type": "v_prediction"}
    if ZERO_TERMINAL_SNR_MARKER in markers:
        settings["rescale_betas_zero_snr"] = True
    return settings


def encode_prompt(
    components: SDXLComponents,
    captions: list[str],
    device: torch.device | str,
    max_caption_tokens: int = WINDOW_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 77, hidden_1 + hidden_2), pooled_prompt_embeds (B, projection_dim)).

    As `StableDiffusionXLPipeline.encode_prompt(do_classifier_free_guidance=False)`: the penultimate
    hidden states of both text encoders side by side, and the second encoder's projected pooled output.
    An empty caption (caption dropout) is encoded as the text "", as the diffusers and kohya training
    scripts do; the all-zeros embedding the pipeline uses for an empty *negative* prompt is a sampling
    choice, not what the model was trained to treat as "no caption". Gradients flow when the encoders
    have trainable (LoRA) weights; callers wrap this in `torch.no_grad()` otherwise.

    `max_caption_tokens` 150 or 225 (`data.max_caption_tokens`, kohya's `--max_token_length`) encodes
    the caption's tokens in windows of 75 (`caption_windows`), each through the encoders alone, and
    joins them as kohya does: the first window's BOS, every window's 75 tokens, the last window's final
    token, so prompt_embeds is (B, 2 + max_caption_tokens, ...). The pooled embedding is the first
    window's (its EOS token's projected state), as in kohya's sd-scripts.
    """
    hidden_states = []
    pooled = None
    for tokenizer, text_encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        if max_caption_tokens == WINDOW_TOKENS:
            token_ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = text_encoder(token_ids.to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            # CLIPTextModelWithProjection's first output is the projected pooled embedding.
            pooled = output[0]
            continue
        windows = caption_windows(tokenizer, captions, max_caption_tokens)
        batch, count, length = windows.shape
        output = text_encoder(windows.reshape(batch * count, length).to(device), output_hidden_states=True)
        per_window = output.hidden_states[-2].reshape(batch, count, length, -1)
        hidden_states.append(
            torch.cat(
                [per_window[:, 0, :1], per_window[:, :, 1:-1].flatten(1, 2), per_window[:, -1, -1:]], dim=1
            )
        )
        pooled = output[0].reshape(batch, count, -1)[:, 0]
    prompt_embeds = torch.cat(hidden_states, dim=-1).to(dtype=components.text_encoder_2.dtype)
    return prompt_embeds, pooled


def caption_windows(tokenizer: CLIPTokenizer, captions: list[str], max_caption_tokens: int) -> torch.Tensor:
    """(B, max_caption_tokens / 75, 77) token ids: each caption's first `max_caption_tokens` tokens, 75 per
    window, each window framed by BOS and a last token, as kohya's sd-scripts frames them.

    The caption is tokenized to 2 + max_caption_tokens ids (BOS, text, EOS, padding), then cut. The first
    tokenizer pads with EOS, so a window's last token is EOS wherever it is cut. The second pads with
    `!`: a window whose text runs to its end is closed with EOS, and a window past the caption's end
    starts with EOS (BOS EOS ! ! ...), so it reads as an empty caption rather than a run of padding.
    """
    body = tokenizer.model_max_length - 2
    token_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=max_caption_tokens + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, max_caption_tokens + 1, body):
        window = torch.cat([token_ids[:, :1], token_ids[:, start : start + body], token_ids[:, -1:]], dim=1)
        if pad != eos:
            window[(window[:, -2] != eos) & (window[:, -2] != pad), -1] = eos
            window[window[:, 1] == pad, 1] = eos
        windows.append(window)
    return torch.stack(windows, dim=1)


def caption_token_count(tokenizer: CLIPTokenizer, caption: str) -> int:
    """How many tokens a caption is, without BOS and EOS: more than `data.max_caption_tokens` are cut."""
    # verbose=False: a caption longer than the window is what is being measured, not a mistake to warn of.
    return len(tokenizer(caption, truncation=False, verbose=False).input_ids) - 2


def compute_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning of one image, (6,): original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def encode_latents(components: SDXLComponents, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 4, H/8, W/8) latents, scaled by the VAE's scaling factor, from pixels in [-1, 1].

    Takes the mean of the VAE's posterior rather than a sample, unlike diffusers' training example: its
    spread is tiny for SDXL's VAE, and the mean makes a cached latent equal the uncached one and a
    resumed run repeat itself. Autocast is off so a mixed-precision run keeps the fp32 VAE in fp32.
    """
    vae = components.vae
    device_type = vae.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        posterior = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mode() * vae.config.scaling_factor
