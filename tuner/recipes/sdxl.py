"""SDXL LoRA: captioned images in, a diffusers LoRA file out.

The pipeline, top to bottom: resolve the model -> device and Accelerator -> write the resolved config
-> scan the captioned images -> bucket and plan crops -> load the SDXL parts -> LoRA on the UNet (and
optionally both text encoders) -> cache latents and text embeddings -> optimizer and schedule -> the
shared training loop -> save the adapter (and its EMA twin) -> a final grid of samples.

The objective is diffusers' SDXL LoRA example's: DDPM forward noising of VAE latents, an epsilon or
v-prediction target, optional min-SNR weighting (see `tuner.models.sdxl_loss`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

import tuner
from tuner.config.keys import check_evaluation_keys, refuse_keys_without_effect, refuse_unused_keys
from tuner.config.schema import DataConfig, DataSource, LoraConfig, RunConfig
from tuner.data.buckets import CropPlan, bucket_histogram, nearest_bucket, plan_crop, sdxl_buckets
from tuner.data.captions import (
    CaptionedImage,
    caption_prefix_of,
    scan_caption_dataset,
    tag_frequency,
    transform_caption,
)
from tuner.data.check import DataReport, caption_cuts
from tuner.data.masks import find_masks, mask_counts
from tuner.data.mixing import (
    Portion,
    balance_regularisation,
    epoch_buckets,
    expand_repeats,
    filled_caption_notes,
    format_mix,
    hold_out_validation,
    is_plain,
    mix_rows,
    split_portions,
)
from tuner.data.sampling import GroupedBatchSampler
from tuner.distributed import PerSampleSeeds, launched_rank
from tuner.errors import ConfigError
from tuner.formats.kohya import refuse_kohya_only_dora
from tuner.models.sdxl import SDXLComponents, caption_token_count, load_sdxl
from tuner.models.sdxl_cache import build_sdxl_dataset, collate_sdxl, model_fingerprint
from tuner.models.sdxl_lora import (
    ADAPTER_FILE,
    EMA_ADAPTER_FILE,
    KOHYA_ADAPTER_FILE,
    TEXT_ENCODER_TARGETS,
    add_lora,
    load_init_adapter,
    lora_config,
    save_sdxl_lora,
    target_groups,
    train_loaded_adapter,
    unet_target_modules,
)
from tuner.models.sdxl_loss import (
    Schedule,
    SDXLLoraModel,
    choose_schedule,
    noise_settings,
    training_scheduler,
)
from tuner.models.sdxl_merge import base_weights_of
from tuner.models.sdxl_sampling import EncodedPrompt, encode_sample_prompts, sample_images
from tuner.recipes.common import open_output_folder, record_run, resolve_base_model
from tuner.runtime.device import (
    build_accelerator,
    configure_unet_attention,
    release_host_memory,
    resolve_runtime,
    set_cpu_threads,
)
from tuner.tiny.datasets import resolve_tiny_dataset
from tuner.training.bad_data import admit_dataset
from tuner.training.ema import parameters_replaced
from tuner.training.loop import LossParts, TrainingJob, run_training, settings_from_config
from tuner.training.optim import build_lr_scheduler, build_optimizer, lora_plus_groups
from tuner.training.trackers import finish_trackers, log_sample_images

TASK = "sdxl-lora"
# Without sample prompts, the first few distinct training captions are sampled.
DEFAULT_SAMPLE_PROMPTS = 2
# Keys this recipe does not read (Qwen-VL's): refused unless left at their defaults. The UNet LoRA and
# its optimizer state are small, so processes share the model by plain data parallel (runtime.distributed
# ZeRO/FSDP are Qwen-VL's); the UNet's attention kernel follows the device (configure_unet_attention).
UNUSED_KEYS = (
    "model.trust_remote_code",
    "model.attention",
    "model.linear_patch_embed",
    "model.npu_fused_kernels",
    "model.liger_kernels",
    "data.image_root",
    "data.max_pixels",
    "data.min_pixels",
    "data.max_length",
    "data.overlength",
    "data.group_by_length",
    "data.packing",
    "data.thinking",
    "data.video_fps",
    "data.video_min_frames",
    "data.video_max_frames",
    "data.video_max_pixels",
    "lora.lr_vision",
    "lora.lr_merger",
    "runtime.distributed",
    # Scoring during training is Qwen-VL's (answers against references); SDXL adapters are compared
    # afterwards with `tuner eval sdxl` (prompt x seed grids, CLIP score).
    "output.eval_data",
    "output.eval_every",
)
# PEFT's folder layout is Qwen-VL's; SDXL writes diffusers and kohya files.
SAVE_FORMATS = ("diffusers", "kohya", "both")


def train_sdxl_lora(config: RunConfig, resume: str | None = None) -> Path:
    """Train a LoRA adapter on SDXL as `config` says; returns the output folder."""
    refuse_unused_keys(config, TASK, UNUSED_KEYS)
    refuse_keys_without_effect(config)
    check_evaluation_keys(config)  # output.keep_best: validation_loss
    if config.output.save_format not in SAVE_FORMATS:
        raise ConfigError(
            f"output.save_format={config.output.save_format!r} is not an SDXL format",
            hint=f"use one of {', '.join(SAVE_FORMATS)} (peft is Qwen-VL's adapter folder)",
        )
    refuse_kohya_only_dora(config.output.save_format, config.lora.variant)
    refuse_init_adapter_options(config.lora)
    output_dir = open_output_folder(config, TASK, resume)
    # The data is checked before any model loads: a refusal costs seconds, not a model load.
    portions = load_masks(config, load_training_portions(config))
    # A folder whose every image was skipped (--skip-bad) trains nothing and has nothing to balance.
    portions = [portion for portion in portions if portion.samples]
    samples = [sample for portion in portions for sample in portion.samples]
    set_seed(config.train.seed)
    model_path, base_model = resolve_base_model(config, TASK)

    runtime = resolve_runtime(config.runtime.device, config.runtime.mixed_precision, config.runtime.devices)
    set_cpu_threads(config.runtime.num_threads)
    accelerator = build_accelerator(runtime, config.train.grad_accum, output_dir)
    record_run(config, accelerator, output_dir)
    if config.data.masked_loss:
        # Said up front: a mask folder that matched nothing would otherwise train silently unmasked.
        accelerator.print(mask_counts(samples))

    # Validation measures what the run learns: instance images only, held out before any repeats.
    # Class (prior) images all train.
    portions, validation_samples = hold_out_validation(
        portions, config.data.validation_fraction, config.train.seed
    )
    portions = balance_regularisation(portions)
    images = [sample for portion in portions for sample in portion.samples]
    image_plans = plan_crops(images, config.data, config.train.seed)
    buckets = [plan.bucket for plan in image_plans]
    mix = mix_rows(portions, buckets)
    if not is_plain(portions):
        accelerator.print(format_mix(mix))
    train_samples, train_plans, shares = expand_repeats(portions, image_plans)
    has_prior = any(sample.prior for sample in images)
    accelerator.print(
        bucket_histogram(epoch_buckets(portions, buckets), config.train.batch_size, unit="samples")
    )

    model_config = config.model
    components = load_sdxl(
        model_path,
        vae=model_config.vae,
        revision=model_config.revision,
        variant=model_config.variant,
        weight_dtype=runtime.compute_dtype,
        allow_pickle=model_config.allow_pickle,
        vae_half_precision_safe=model_config.vae_half_precision_safe,
        single_file_config=model_config.single_file_config,
    )
    configure_unet_attention(components.unet, runtime)
    # Said up front: tokens past data.max_caption_tokens never reach the model (kohya_ss #2956).
    captions = [
        transform_caption(
            sample.caption, prefix=caption_prefix_of(sample, config.data.caption_prefix), rng=random.Random(0)
        )
        for sample in images
    ]
    count_tokens = functools.partial(caption_token_count, components.tokenizer)
    cuts = caption_cuts(captions, count_tokens, config.data.max_caption_tokens)
    accelerator.print(f"caption tokens: {cuts.line()}")
    if config.runtime.channels_last:
        # Same numbers, another layout: convolution libraries (oneDNN, cuDNN) have faster NHWC kernels.
        components.unet.to(memory_format=torch.channels_last)
    if config.lora.init_adapter:
        # The file's rank, alpha and targets are the run's from here on (the adapter header records them).
        lora_groups, lora = start_from_adapter(components, config.lora, config.optim.lr)
        config = config.model_copy(update={"lora": lora})
    else:
        lora_groups = setup_lora(components, config.lora, config.optim.lr)
    parameter_groups = lora_plus_groups(
        lora_groups,
        [components.unet, components.text_encoder, components.text_encoder_2],
        config.optim.lr,
        config.lora.lr_ratio,
    )
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(components, config.lora.text_encoder)
    if config.runtime.compile:
        # In place (nn.Module.compile), so parameter names, LoRA saving and EMA see the plain UNet.
        components.unet.compile()
    schedule = choose_schedule(
        components.noise_scheduler,
        components.schedule_markers,
        prediction_type=config.train.prediction_type,
        zero_terminal_snr=config.train.zero_terminal_snr,
    )
    # Said up front: a v-prediction checkpoint trained as epsilon would only show in ruined samples.
    accelerator.print(schedule.describe())
    # Sample grids build their sampler from this scheduler's config, so they follow the same schedule.
    components.noise_scheduler = training_scheduler(components.noise_scheduler, schedule)
    settings = noise_settings(
        components.noise_scheduler,
        prediction_type=schedule.prediction_type,
        snr_gamma=config.train.snr_gamma,
        noise_offset=config.train.noise_offset,
        pyramid_noise_discount=config.train.pyramid_noise_discount,
        timestep_min=config.train.timestep_min,
        timestep_max=config.train.timestep_max,
        loss=config.train.loss,
        huber_c=config.train.huber_c,
        huber_schedule=config.train.huber_schedule,
    )

    # Training the text encoders changes their outputs every step: nothing about the text can be cached.
    cache = config.train.cache and not config.lora.text_encoder
    if config.train.cache and not cache:
        accelerator.print("note: caching is off because lora.text_encoder trains the text encoders")
    dataset_of = functools.partial(
        build_dataset,
        components=components,
        config=config,
        cache=cache,
        accelerator=accelerator,
        output_dir=output_dir,
        model_name=base_model,
    )
    # Noise and timesteps per sample from (seed, index, epoch): the same adapter on any process count.
    dataset = PerSampleSeeds(
        dataset_of(train_samples, train_plans, caption_options=caption_options(config.data)),
        config.train.seed,
    )
    validation_batches = None
    if validation_samples:
        validation_plans = plan_crops(validation_samples, config.data, config.train.seed)
        # Validation sees every caption as written, so its loss is comparable between evaluations.
        validation = dataset_of(
            validation_samples, validation_plans, caption_options={"prefix": config.data.caption_prefix}
        )
        validation_batches = fixed_batches(validation, validation_plans, config.train.batch_size)

    # What the cache holds decides what each step still encodes (the cache keeps the caption when tag
    # shuffling or caption dropout make the text differ per step).
    first_item = dataset[0]
    encodes_images, encodes_captions = "latents" not in first_item, "prompt_embeds" not in first_item
    model = SDXLLoraModel(
        components,
        settings,
        encodes_images=encodes_images,
        encodes_captions=encodes_captions,
        prior_loss_weight=config.data.prior_loss_weight,
        max_caption_tokens=config.data.max_caption_tokens,
    )
    prompts = config.output.sample_prompts or default_sample_prompts(
        [sample for sample in images if not sample.prior], config.data.caption_prefix
    )
    if not encodes_captions:
        # Every caption is cached, so the text encoders are needed only for the sample prompts: encode
        # those now and free the encoders (1.6 GB in bf16 at full size) for the rest of the run.
        prompts = encode_sample_prompts(components, prompts, accelerator.device)
        components.text_encoder = components.text_encoder_2 = None
    offload_unused_vae(components, encodes_images)
    accelerator.free_memory()
    release_host_memory()

    groups = bucket_groups(train_plans)
    batch_sampler = GroupedBatchSampler(
        groups,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        shuffle=True,
        drop_last=False,
        shares=shares,
    )
    loop_settings = settings_from_config(config, len(batch_sampler), accelerator.num_processes)
    optim = config.optim
    optimizer = build_optimizer(
        optim.name,
        parameter_groups,
        optim.lr,
        optim.weight_decay,
        optim.betas,
        optim.eps,
        runtime.device_type,
    )
    lr_scheduler = build_lr_scheduler(optimizer, optim.scheduler, optim.warmup_steps, loop_settings.max_steps)

    job = TrainingJob(
        model=model,
        # With class images, the instance and prior losses are logged apart (loss/instance, loss/prior).
        loss_fn=functools.partial(batch_loss, with_parts=True) if has_prior else batch_loss,
        loss_parts=("instance", "prior") if has_prior else (),
        dataset=dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_sdxl,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        sample_fn=functools.partial(
            write_sample_grid, components, prompts, config, accelerator, settings.prediction_type
        ),
        validation_batches=validation_batches,
        num_workers=config.data.num_workers,
        pin_memory=config.data.pin_memory,
        batch_size_of=lambda batch: batch["time_ids"].shape[0],
    )
    try:
        result = run_training(
            job, settings=loop_settings, accelerator=accelerator, output_dir=output_dir, resume=resume
        )
    finally:
        finish_trackers(accelerator)  # also when training stops early

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        epochs = math.ceil(result.step / steps_per_epoch(len(batch_sampler), config, accelerator))
        metadata = adapter_metadata(config, base_model, images, mix, result.step, epochs, schedule)
        adapter_file = save_adapters(components, output_dir, ADAPTER_FILE, metadata)
        if config.output.save_format in ("kohya", "both"):
            from tuner.formats.kohya import export_kohya

            # Named after this UNet's own layout, whatever the base.
            export_kohya(
                adapter_file,
                output_dir / KOHYA_ADAPTER_FILE,
                dict(components.unet.config),
                title=output_dir.name,
                base_weight=base_weights_of(components),
            )
            if config.output.save_format == "kohya":
                adapter_file.unlink()
        if result.ema_state:
            with parameters_replaced(accelerator.unwrap_model(model), result.ema_state):
                save_adapters(
                    components,
                    output_dir,
                    EMA_ADAPTER_FILE,
                    {**metadata, "ema_decay": config.train.ema_decay},
                )
    return output_dir


def steps_per_epoch(batches_per_epoch: int, config: RunConfig, accelerator) -> int:
    """Optimizer steps per epoch, as `settings_from_config` counts them (each process takes its share
    of the batches, an epoch ends with a step even when fewer than grad_accum batches are left)."""
    return math.ceil(math.ceil(batches_per_epoch / accelerator.num_processes) / config.train.grad_accum)


def batch_loss(
    model: torch.nn.Module, batch: dict, with_parts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
    """The diffusion loss of one batch: `SDXLLoraModel.forward`, called through any wrapper the loop adds
    (with its instance and prior parts when `with_parts`)."""
    return model(batch, with_parts=with_parts)


def data_sources(data: DataConfig) -> list[DataSource]:
    """The run's image sources: `data.path` (with `data.repeats`) first, then `data.sources`."""
    first = [DataSource(path=data.path, repeats=data.repeats)] if data.path else []
    return first + list(data.sources)


def load_training_portions(config: RunConfig) -> list[Portion]:
    """Every captioned image of every source, split into portions that train alike (kohya `N_words/`
    folders, repeats, class images); any problem in any source stops the run, listing the first few."""
    data = config.data
    sources = data_sources(data)
    if all(source.reg for source in sources):
        raise ConfigError(
            "every data source is a regularisation source: there are no instance images to train",
            hint="pass the images to learn with --data (data.path), the class images with --reg-data",
        )
    if data.class_prompt and not any(source.reg for source in sources):
        raise ConfigError(
            f"data.class_prompt={data.class_prompt!r} is set, but no source holds class images",
            hint="add the class images with --reg-data DIR (a data.sources entry with reg: true)",
        )
    portions: list[Portion] = []
    reports: list[DataReport] = []
    notes: list[str] = []
    for source in sources:
        path = resolve_tiny_dataset(source.path, TASK)
        scan = scan_caption_dataset(
            path,
            data.image_column,
            data.caption_column,
            check_images=True,
            max_pixels=data.max_image_pixels,
            class_prompt=data.class_prompt if source.reg else None,
        )
        portions += split_portions(source, scan)
        reports.append(
            DataReport("sdxl", str(path), len(scan.samples), scan.problems, {}, "", warnings=scan.warnings)
        )
        notes += filled_caption_notes(source.path, scan)
    report = DataReport(
        "sdxl",
        " + ".join(report.path for report in reports),
        sum(report.samples_ok for report in reports),
        [problem for report in reports for problem in report.problems],
        stats={},
        histogram="",
        warnings=[warning for report in reports for warning in report.warnings],
    )
    main_process = launched_rank() == 0
    admit_dataset(report, Path(config.output.dir), data.skip_bad, data.max_bad_fraction, main_process)
    for note in notes if main_process else []:
        print(note)  # a caption the user did not write is never a surprise
    return portions


def load_masks(config: RunConfig, portions: list[Portion]) -> list[Portion]:
    """With `data.masked_loss`, the portions' samples with their loss masks (`tuner.data.masks`); a mask
    problem stops the run (or skips its sample, under `data.skip_bad`) like any other data problem. The
    masks of every source are checked together, so the problems are reported and counted once."""
    data = config.data
    if data.mask_dir and not data.masked_loss:
        raise ConfigError(
            f"data.mask_dir={data.mask_dir!r} is set, but data.masked_loss is off: the masks would be unused",
            hint="add --masked-loss (data.masked_loss: true), or leave out --mask-dir",
        )
    if not data.masked_loss:
        return portions
    samples = [sample for portion in portions for sample in portion.samples]
    scan = find_masks(samples, data.mask_dir, data.max_image_pixels)
    where = data.mask_dir or "masks of " + " + ".join(source.path for source in data_sources(data))
    report = DataReport("sdxl", where, len(scan.samples), scan.problems, stats={}, histogram="")
    admit_dataset(
        report,
        Path(config.output.dir),
        data.skip_bad,
        data.max_bad_fraction,
        main_process=launched_rank() == 0,
    )
    # find_masks sets `mask` alone (and leaves out the skipped samples): map each sample back to its portion.
    masked = {replace(sample, mask=None): sample for sample in scan.samples}
    return [
        replace(portion, samples=tuple(masked[sample] for sample in portion.samples if sample in masked))
        for portion in portions
    ]


def plan_crops(samples: Sequence[CaptionedImage], data: DataConfig, seed: int) -> list[CropPlan]:
    """Each sample's bucket and crop: the nearest-aspect bucket, or one square of `data.resolution`."""
    buckets = sdxl_buckets(data.resolution, data.bucket_step) if data.bucketing else None
    rng = random.Random(seed)
    plans = []
    for sample in samples:
        width, height = sample.load(data.background, data.max_image_pixels).size
        bucket = nearest_bucket(width, height, buckets) if buckets else (data.resolution, data.resolution)
        plans.append(plan_crop(width, height, bucket, center=data.center_crop, rng=rng))
    return plans


def bucket_groups(plans: Sequence[CropPlan]) -> list[int]:
    """A group id per sample: samples of one bucket share batches (their latents have one shape)."""
    ids: dict[tuple[int, int], int] = {}
    return [ids.setdefault(plan.bucket, len(ids)) for plan in plans]


def setup_lora(components: SDXLComponents, lora: LoraConfig, lr: float) -> list[dict]:
    """Add the LoRA adapters; returns the optimizer's parameter groups (text encoders at their own lr)."""
    options = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "init": lora.init,
        "use_rslora": lora.use_rslora,
        "variant": lora.variant,
    }
    groups = [
        {"params": add_lora(components.unet, lora_config(unet_target_modules(lora.targets), **options))}
    ]
    if lora.text_encoder:
        text_parameters = [
            parameter
            for encoder in (components.text_encoder, components.text_encoder_2)
            for parameter in add_lora(encoder, lora_config(TEXT_ENCODER_TARGETS, **options))
        ]
        groups.append({"params": text_parameters, "lr": lora.text_encoder_lr or lr})
    return groups


# With lora.init_adapter the file says these; a value set beside it that differs is refused.
_OPTIONS_THE_FILE_SETS = {"variant": "lora", "init": "default", "dropout": 0.0, "use_rslora": False}


def refuse_init_adapter_options(lora: LoraConfig) -> None:
    """Refuse, before any model loads, LoRA options that cannot act on an adapter read from a file."""
    if not lora.init_adapter:
        return
    for key, default in _OPTIONS_THE_FILE_SETS.items():
        value = getattr(lora, key)
        if value != default:
            raise ConfigError(
                f"lora.{key}={value!r} does not apply with lora.init_adapter {lora.init_adapter}: the "
                "adapter starts as the file holds it",
                hint=f"remove lora.{key} (a LoRA file is continued as a plain LoRA)",
            )


def start_from_adapter(
    components: SDXLComponents, lora: LoraConfig, lr: float
) -> tuple[list[dict], LoraConfig]:
    """Inject `lora.init_adapter` as the trainable adapter; returns the optimizer's parameter groups and
    `lora` with the file's rank, alpha and targets. A rank, alpha or targets the user set that the file
    contradicts is refused: the run would otherwise train something else than asked."""
    configs = load_init_adapter(
        Path(lora.init_adapter),
        components.unet,
        components.text_encoder,
        components.text_encoder_2,
        train_text_encoders=lora.text_encoder,
    )
    unet = configs["unet"]
    ranks = sorted({unet.r, *unet.rank_pattern.values()})
    alphas = sorted({unet.lora_alpha, *unet.alpha_pattern.values()})
    groups = target_groups(unet.target_modules)
    given = lora.model_fields_set
    contradictions = [
        ("rank", lora.rank, ranks, "--rank"),
        ("alpha", lora.alpha, alphas, "--alpha"),
    ]
    for key, value, in_file, flag in contradictions:
        if key in given and in_file != [value]:
            raise ConfigError(
                f"lora.{key}={value:g} contradicts lora.init_adapter {lora.init_adapter}, whose {key} is "
                f"{', '.join(f'{number:g}' for number in in_file)}",
                hint=f"remove {flag} / lora.{key}: the run takes it from the file",
            )
    if "targets" in given and target_groups(unet_target_modules(lora.targets)) != groups:
        raise ConfigError(
            f"lora.targets={'+'.join(lora.targets)} contradicts lora.init_adapter {lora.init_adapter}, "
            f"which adapts {'+'.join(groups)}",
            hint="remove lora.targets: the run takes them from the file",
        )
    parameter_groups = [{"params": train_loaded_adapter(components.unet)}]
    if lora.text_encoder:
        text_parameters = [
            parameter
            for encoder in (components.text_encoder, components.text_encoder_2)
            for parameter in train_loaded_adapter(encoder)
        ]
        parameter_groups.append({"params": text_parameters, "lr": lora.text_encoder_lr or lr})
    adopted = {"rank": unet.r, "alpha": float(unet.lora_alpha), "targets": ["+".join(groups)]}
    return parameter_groups, lora.model_copy(update=adopted)


def offload_unused_vae(components: SDXLComponents, encodes_images: bool) -> None:
    """Park the VAE on the CPU when no step encodes images (sampling borrows it back to decode)."""
    if not encodes_images:
        components.vae.to("cpu")


def enable_gradient_checkpointing(components: SDXLComponents, text_encoders: bool) -> None:
    components.unet.enable_gradient_checkpointing()
    if text_encoders:
        components.text_encoder.gradient_checkpointing_enable()
        components.text_encoder_2.gradient_checkpointing_enable()


def caption_options(data: DataConfig) -> dict:
    return {
        "prefix": data.caption_prefix,
        "shuffle_tags": data.shuffle_tags,
        "keep_tags": data.keep_tags,
        "dropout": data.caption_dropout,
    }


def build_dataset(
    samples: list[CaptionedImage],
    plans: list[CropPlan],
    *,
    caption_options: dict,
    components: SDXLComponents,
    config: RunConfig,
    cache: bool,
    accelerator,
    output_dir: Path,
    model_name: str,
) -> torch.utils.data.Dataset:
    components.vae.to(accelerator.device)
    components.text_encoder.to(accelerator.device)
    components.text_encoder_2.to(accelerator.device)
    return build_sdxl_dataset(
        samples,
        plans,
        components,
        cache=cache,
        cache_dir=Path(config.train.cache_dir) if config.train.cache_dir else output_dir / "cache",
        model_fingerprint=model_fingerprint(model_name, components) if cache else "",
        caption_options=caption_options,
        background=config.data.background,
        max_image_pixels=config.data.max_image_pixels,
        random_flip=config.data.random_flip,
        seed=config.train.seed,
        device=accelerator.device,
        accelerator=accelerator,
        masked_loss=config.data.masked_loss,
        max_caption_tokens=config.data.max_caption_tokens,
    )


def fixed_batches(
    dataset: torch.utils.data.Dataset, plans: Sequence[CropPlan], batch_size: int
) -> list[dict]:
    """Validation batches, one bucket each (the loop seeds their noise, so evaluations compare)."""
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, plan in enumerate(plans):
        by_bucket[plan.bucket].append(index)
    batches = []
    for indices in by_bucket.values():
        for start in range(0, len(indices), batch_size):
            batches.append(collate_sdxl([dataset[index] for index in indices[start : start + batch_size]]))
    return batches


def default_sample_prompts(samples: Sequence[CaptionedImage], trigger: str) -> list[str]:
    """The first few distinct captions of `samples`, as they train (with their prefix)."""
    rng = random.Random(0)  # never drawn from: no shuffle, no dropout
    captions = [transform_caption(s.caption, prefix=caption_prefix_of(s, trigger), rng=rng) for s in samples]
    return list(dict.fromkeys(captions))[:DEFAULT_SAMPLE_PROMPTS]


def write_sample_grid(
    components: SDXLComponents,
    prompts: Sequence[str | EncodedPrompt],
    config: RunConfig,
    accelerator,
    prediction_type: str,
    step: int,
    samples_dir: Path,
) -> None:
    """`samples_dir/step-NNNNNN.png`: one row per prompt, at the training resolution, seeded by train.seed,
    sampled for the `prediction_type` the run trains."""
    if not accelerator.is_main_process:
        return
    resolution = config.data.resolution
    with accelerator.autocast():
        sample_images(
            components,
            prompts,
            [config.train.seed],
            config.output.sample_steps,
            (resolution, resolution),
            Path(samples_dir) / f"step-{step:06d}.png",
            device=accelerator.device,
            prediction_type=prediction_type,
        )
    log_sample_images(accelerator, step, [Path(samples_dir) / f"step-{step:06d}.png"])


def adapter_metadata(
    config: RunConfig,
    base_model: str,
    samples: Sequence[CaptionedImage],
    mix: Sequence[dict],
    steps: int,
    epochs: int,
    schedule: Schedule,
) -> dict:
    """What the adapter file records about its run (safetensors header, `tuner.*` keys; the kohya export
    turns them into the `ss_*` / `modelspec.*` keys ComfyUI, A1111 and Forge show).

    `samples` are the distinct training images (instance and class), `mix` the rows of `mix_rows`:
    samples per epoch count repeats, as kohya's `ss_num_train_images` / `ss_num_reg_images` do.

    `schedule` is the resolved prediction type and noise schedule (never `auto`): `tuner infer sdxl` and
    `tuner eval sdxl` configure their scheduler from them, as the sample grids do. They are the only
    scheduler settings training changes.
    """
    lora = config.lora
    train = config.train
    from tuner.formats.kohya import base_model_hashes

    return {
        "base_model": base_model,
        **base_model_hashes(base_model),  # kohya's ss_sd_model_hash / ss_new_sd_model_hash of a single file
        "prediction_type": schedule.prediction_type,
        "zero_terminal_snr": schedule.zero_terminal_snr,
        "loss": train.loss,
        **({"huber_c": train.huber_c, "huber_schedule": train.huber_schedule} if train.loss != "mse" else {}),
        "max_caption_tokens": config.data.max_caption_tokens,
        **({"lr_ratio": lora.lr_ratio} if lora.lr_ratio else {}),
        # By file name, as kohya's ss_network_weights records --network_weights.
        **({"init_adapter": Path(lora.init_adapter).name} if lora.init_adapter else {}),
        "rank": lora.rank,
        "alpha": lora.alpha,
        "variant": lora.variant,
        "targets": "+".join(lora.targets or ["attention"]),
        "text_encoder": lora.text_encoder,
        "steps": steps,
        "epochs": epochs,
        "resolution": config.data.resolution,
        "caption_prefix": config.data.caption_prefix,
        "images": sum(not sample.prior for sample in samples),
        "reg_images": sum(sample.prior for sample in samples),
        "train_samples": sum(row["samples_per_epoch"] for row in mix if row["kind"] == "instance"),
        "reg_samples": sum(row["samples_per_epoch"] for row in mix if row["kind"] != "instance"),
        "dataset_dirs": json.dumps(dataset_dirs(mix, reg=False), ensure_ascii=False),
        "reg_dataset_dirs": json.dumps(dataset_dirs(mix, reg=True), ensure_ascii=False),
        "masked_loss": config.data.masked_loss,
        **({"masks": json.dumps(mask_counts(samples).to_json())} if config.data.masked_loss else {}),
        "tag_frequency": json.dumps(tag_frequency(list(samples)), ensure_ascii=False),
        "dataset_hash": dataset_hash(samples),
        "tuner_version": tuner.__version__,
    }


def dataset_dirs(mix: Sequence[dict], reg: bool) -> dict[str, dict[str, float]]:
    """{folder: {"n_repeats", "img_count"}} of the instance (or class) portions, as kohya's
    `ss_dataset_dirs` / `ss_reg_dataset_dirs` hold them; a name seen twice gets " (2)", as in kohya."""
    dirs: dict[str, dict[str, float]] = {}
    for row in mix:
        if (row["kind"] != "instance") != reg:
            continue
        name, number = row["folder"], 2
        while name in dirs:
            name, number = f"{row['folder']} ({number})", number + 1
        repeats = row["repeats"]
        dirs[name] = {
            "n_repeats": int(repeats) if float(repeats).is_integer() else repeats,
            "img_count": row["images"],
        }
    return dirs


def dataset_hash(samples: Sequence[CaptionedImage]) -> str:
    """A hash of which images (by name and size in bytes) were trained with which captions.

    Cheap by design: reading every image's bytes would cost as much as a caching pass. It changes when
    a caption, an image's size or the set of images changes.
    """
    digest = hashlib.sha256()
    for sample in samples:
        image = sample.image
        size = image.stat().st_size if isinstance(image, Path) else ""
        digest.update(f"{sample.source}\0{size}\0{sample.caption}\n".encode())
    return digest.hexdigest()[:16]


def save_adapters(components: SDXLComponents, output_dir: Path, weight_name: str, metadata: dict) -> Path:
    return save_sdxl_lora(
        output_dir,
        components.unet,
        components.text_encoder,
        components.text_encoder_2,
        weight_name=weight_name,
        training_metadata=metadata,
    )
