"""The one validated config of a run.

Every section is a strict pydantic model: unknown keys are errors (the loader turns them into a
message that suggests the closest valid key). Defaults here are the built-in layer; presets, the
user's file, flags and `--set` override them in that order (see `tuner.config.load`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Task = Literal["sdxl-lora", "qwenvl-lora"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    # A hub ID, a local folder, a single-file .safetensors checkpoint (SDXL), or `tiny` for the
    # built-in tiny model of the task's family (`tiny-qwen2-vl`, `tiny-qwen2.5-vl`, `tiny-qwen3-vl`).
    name_or_path: str = "tiny"
    revision: str | None = None
    variant: str | None = None
    # A separate VAE (SDXL), e.g. the fp16-safe `madebyollin/sdxl-vae-fp16-fix`.
    vae: str | None = None
    # Set when the supplied VAE is known not to overflow in half precision; otherwise the VAE runs fp32.
    vae_half_precision_safe: bool = False
    # A single-file SDXL checkpoint carries weights only: the diffusers folder or hub ID whose layout it
    # follows (diffusers fetches SDXL base's config when this is unset, which offline runs cannot).
    single_file_config: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # Attention kernel: `sdpa` everywhere; `flash_attention_2` with the flash-attn package on CUDA, or
    # torch_npu's fused attention on Ascend (transformers routes it there); `eager` to debug.
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    # Qwen-VL fast paths (tuner.models.qwenvl_patches): the vision patch embedding as the identical
    # Linear (Conv3d is slow and lacks bf16 kernels on older CANN); torch_npu's fused RMSNorm/rotary/
    # SwiGLU (NPU only, opt-in); Liger kernels on CUDA when installed (opt-in).
    linear_patch_embed: bool = True
    npu_fused_kernels: bool = False
    liger_kernels: bool = False


class DataSource(Section):
    """One more SDXL image folder mixed into the run (`data.sources`, or `--data` given again)."""

    path: str
    # Times each image is seen per epoch. Fractional values take a seeded share of each bucket per epoch
    # (0.5: half of the images, others next epoch). None: the kohya folder prefix (`10_name/` -> 10), else 1.
    repeats: float | None = Field(None, gt=0)
    # Regularisation (prior-preservation) images: their loss is the prior loss (data.prior_loss_weight).
    reg: bool = False
    # The trigger word(s) put before this source's captions. None: data.caption_prefix for instance images,
    # none for class images (a class image shows the class, not the subject); set it on a class source to
    # prefix its captions too, as kohya's sd-scripts do.
    caption_prefix: str | None = None


class DataConfig(Section):
    path: str | None = None
    # SDXL: times each image of data.path is seen per epoch, as DataSource.repeats (None: folder prefixes).
    repeats: float | None = Field(None, gt=0)
    # SDXL: more folders beside data.path, each with its own repeats (or `reg: true` for class images).
    sources: list[DataSource] = Field(default_factory=list)
    # Columns for a Hugging Face dataset or a metadata.jsonl/csv folder (SDXL).
    image_column: str = "image"
    caption_column: str = "text"
    # Qwen-VL image paths are relative to this folder (default: the data file's folder).
    image_root: str | None = None
    # SDXL: the square side whose area sets the bucket set (1024 -> buckets of ~1024*1024 px).
    resolution: int = 1024
    bucketing: bool = True
    bucket_step: int = 64
    center_crop: bool = True
    random_flip: bool = False
    # Background colour for images with transparency (RGBA, LA, P with transparency).
    background: tuple[int, int, int] = (255, 255, 255)
    caption_prefix: str = ""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = False
    keep_tags: int = Field(0, ge=0)
    # Refuse images with more pixels than this (decompression bombs).
    max_image_pixels: int = 178_956_970
    # Qwen-VL: bounds for the processor's dynamic resolution, in pixels.
    max_pixels: int = 768 * 768
    min_pixels: int = 256 * 28 * 28 // 4
    max_length: int = 2048
    # Over-long samples: `drop` (counted and reported) or `truncate` (never inside an image's tokens).
    overlength: Literal["drop", "truncate"] = "drop"
    group_by_length: bool = True
    # Qwen-VL: a batch's samples end to end in one row instead of padded rows (no padding at all; attention
    # stays inside each sample). Pays off with flash_attention_2's variable-length kernels; with eager/SDPA
    # the block-diagonal mask still costs the attention of the whole row.
    packing: bool = False
    # Qwen-VL: what trains of the reasoning (`<think>` blocks, reasoning_content) in replies: `keep` it,
    # `strip` it, or write an `empty` think block (see tuner.data.thinking).
    thinking: Literal["keep", "strip", "empty"] = "keep"
    # Qwen-VL videos (tuner.data.video): frames sampled per second of video, at least/at most this many
    # frames (a multiple of 2, spread over the whole video), and the pixels of all of one video's frames
    # together (each frame within min_pixels..max_pixels; fewer pixels per frame for longer videos).
    video_fps: float = Field(2.0, gt=0)
    video_min_frames: int = Field(4, ge=1)
    video_max_frames: int = Field(128, ge=2)
    video_max_pixels: int = Field(4 * 768 * 768, ge=1)
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    skip_bad: bool = False
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    num_workers: int = Field(0, ge=0)
    # Pin batches in host memory for the copy to the device; None: on CUDA, off on NPU (unmeasured there)
    # and on the CPU (tuner.runtime.device.pin_memory_for).
    pin_memory: bool | None = None
    # SDXL regularisation images: the caption of a class image without one, and the prior loss's weight
    # (the loss of class images, logged apart from the instance loss).
    class_prompt: str | None = None
    prior_loss_weight: float = Field(1.0, ge=0.0)
    # SDXL masked loss: a mask per image (white trains, black is ignored, grey weighs in between) from
    # mask_dir (default: `masks/` beside the images) or the image's alpha channel.
    masked_loss: bool = False
    mask_dir: str | None = None
    # SDXL: caption tokens trained per text encoder, kohya's --max_token_length: 75 (one CLIP window, as
    # diffusers' pipeline), or 150/225 as 2/3 windows of 75 encoded apart and joined (docs/sdxl-data.md).
    max_caption_tokens: Literal[75, 150, 225] = 75


# lora.init -> PEFT's `init_lora_weights`, for both families: initialisations that leave the base weights
# untouched, so the adapter alone reproduces the model (PiSSA, OLoRA and LoftQ rewrite the base weights,
# which neither a diffusers LoRA file nor a Qwen-VL adapter for the unchanged base can carry).
LORA_INIT_WEIGHTS: dict[str, bool | str] = {"default": True, "gaussian": "gaussian"}


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # SDXL: `attention`, `attention+ffn`, `attention+ffn+conv`. Qwen-VL: any of `llm`, `vision`, `merger`.
    targets: list[str] = Field(default_factory=list)
    # The keys of LORA_INIT_WEIGHTS.
    init: Literal["default", "gaussian"] = "default"
    # `lora`; `dora` (weight-decomposed LoRA, PEFT's use_dora: a learned magnitude per output channel on
    # top of the LoRA direction; costs step time, see docs/benchmarks.md); SDXL also `lokr` (Kronecker
    # product, PEFT's LoKrConfig) and `loha` (Hadamard product, LoHaConfig), LyCORIS' algorithms.
    variant: Literal["lora", "dora", "lokr", "loha"] = "lora"
    # SDXL: also adapt both text encoders (turns embedding caching off).
    text_encoder: bool = False
    text_encoder_lr: float | None = Field(None, gt=0)
    use_rslora: bool = False
    # LoRA+ (both families): the B (up) matrices learn at this multiple of their group's lr (16 in the
    # paper; kohya's loraplus_lr_ratio). None: one lr for A and B.
    lr_ratio: float | None = Field(None, gt=0)
    # Qwen-VL: learning rates of the vision-tower and merger LoRA weights (default: optim.lr).
    lr_vision: float | None = Field(None, gt=0)
    lr_merger: float | None = Field(None, gt=0)
    # SDXL: start from this LoRA file (tuner's, diffusers', PEFT's or kohya's); its rank, alpha and
    # targets are the run's (a rank or targets that contradict it are refused).
    init_adapter: str | None = None


class OptimConfig(Section):
    name: str = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = 1.0


class TrainConfig(Section):
    batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    # On --resume with more steps than the run was planned for: stretch the lr schedule to the new
    # length (otherwise it keeps the length in the checkpoint, and cosine/linear stay at lr 0 after it).
    extend_schedule: bool = False
    seed: int = 42
    gradient_checkpointing: bool = False
    # SDXL: cache VAE latents and text-encoder outputs before the first step.
    cache: bool = True
    cache_dir: str | None = None
    # SDXL loss options.
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    pyramid_noise_discount: float = 0.0
    timestep_min: int = Field(0, ge=0)
    timestep_max: int = Field(1000, ge=1)
    # SDXL: betas rescaled to zero terminal SNR (kohya's --zero_terminal_snr; needs v_prediction). `auto`
    # takes the model's scheduler config, or a single-file checkpoint's `ztsnr` marker key.
    zero_terminal_snr: Literal["auto", True, False] = "auto"
    # SDXL: `mse`, or kohya's pseudo-Huber `huber` / `smooth_l1`, whose delta is huber_c on huber_schedule
    # (`constant`, `exponential` from 1 down to huber_c, `snr`); see docs/sdxl-training.md.
    loss: Literal["mse", "huber", "smooth_l1"] = "mse"
    huber_c: float = Field(0.1, gt=0, le=1)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    ema_decay: float | None = Field(None, gt=0, lt=1)
    max_nonfinite: int = Field(5, ge=1)


class OutputConfig(Section):
    dir: str | None = None
    checkpoint_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)
    sample_prompts: list[str] = Field(default_factory=list)
    sample_steps: int = Field(25, ge=1)
    # Validation loss every N optimizer steps (with data.validation_fraction > 0); 0 = at the end only.
    validate_every: int = Field(0, ge=0)
    # SDXL: `both` writes the kohya file (ComfyUI, A1111/Forge) beside the diffusers one; see docs/serving.md.
    save_format: Literal["diffusers", "kohya", "both", "peft"] = "both"
    overwrite: bool = False
    # Experiment trackers that also get every scalar, the config and the samples (both recipes):
    # tensorboard, wandb, swanlab, mlflow; each writes into the output folder by default (see docs/report.md).
    log_with: list[Literal["tensorboard", "wandb", "swanlab", "mlflow"]] = Field(default_factory=list)
    # Qwen-VL: score greedy answers to held-out questions during training, as `tuner eval qwenvl` does
    # (a conversations file, or `tiny`), every eval_every optimizer steps (0: at the last step only);
    # logged as `eval/<metric>` beside the loss. See docs/report.md.
    eval_data: str | None = None
    eval_every: int = Field(0, ge=0)
    # Keep the checkpoint with the best `eval/<metric>` (highest) or `validation_loss` (lowest): it is
    # saved at the step it was measured, never pruned, and named at the end of the run.
    keep_best: str | None = Field(None, pattern=r"^(validation_loss|eval/[a-z_]+)$")


class RuntimeConfig(Section):
    # `auto` picks NPU, then CUDA, then CPU.
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    # Comma-separated device indices; mapped to ASCEND_RT_VISIBLE_DEVICES or CUDA_VISIBLE_DEVICES.
    devices: str | None = None
    mixed_precision: MixedPrecision = "auto"
    # How processes share the model: `ddp` (a copy each), `zero2`/`zero3` (DeepSpeed, optional extra),
    # `fsdp`. Qwen-VL only; sdxl-lora refuses anything but ddp. See docs/ascend.md.
    distributed: Literal["ddp", "zero2", "zero3", "fsdp"] = "ddp"
    compile: bool = False
    # SDXL: the UNet in channels-last (NHWC) memory format; see docs/benchmarks.md for when it helps.
    channels_last: bool = False
    num_threads: int | None = Field(None, ge=1)


class HubConfig(Section):
    endpoint: str | None = None
    ca_bundle: str | None = None
    offline: bool = False
    source: Literal["huggingface", "modelscope"] = "huggingface"
    cache_dir: str | None = None
    # Never set by a preset: turns TLS verification off for hub downloads only, loudly.
    insecure_skip_tls_verify: bool = False


class RunConfig(Section):
    task: Task | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
