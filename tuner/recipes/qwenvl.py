"""Qwen-VL LoRA: conversations in, a PEFT adapter (plus the processor and chat template) out.

The pipeline, top to bottom: resolve the model -> device and Accelerator -> write the resolved config
-> read the conversations -> load model and processor, bound image pixels -> LoRA on the chosen targets
-> encode samples lazily, drop over-long ones -> length-grouped batches, padded or packed -> optimizer
and schedule -> the shared training loop, which saves the adapter (and its EMA twin in `ema/`) through
`save_outputs` before its last evaluation -> greedy answers to a few training prompts.

Loss: the model's own causal-LM cross-entropy on the labels, summed over a micro-batch's supervised
(assistant) tokens; the loop divides it by the supervised tokens of the whole optimizer step, summed
over gradient accumulation and processes (as the transformers Trainer does with `num_items_in_batch`).
Every token weighs the same whatever the batch size, accumulation or process count.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from accelerate.utils import set_seed
from PIL import Image

from tuner.config.keys import check_evaluation_keys, refuse_unused_keys
from tuner.config.schema import RunConfig
from tuner.data.check import DataReport, duplicate_conversations
from tuner.data.conversations import Conversation, ConversationRecords, load_conversations
from tuner.data.images import DEFAULT_MAX_PIXELS
from tuner.data.prompts import Prompt, build_prompt, model_inputs
from tuner.data.sampling import GroupedBatchSampler, held_out_indices
from tuner.data.thinking import TrainingSamples, describe_policy
from tuner.data.video import VideoSampling, video_sampling_of
from tuner.data.vl_encoding import (
    IGNORE_INDEX,
    SAMPLE_LENGTHS,
    EncodedSample,
    RopeIndex,
    collate_vl,
    collate_vl_packed,
    encode_conversation,
    packed_model_inputs,
    samples_in_batch,
    set_pixel_bounds,
    token_length,
)
from tuner.distributed import build_distributed_accelerator, gathered_state_dict, launched_rank
from tuner.errors import ConfigError, DataError
from tuner.eval.qwenvl import (
    eval_prompts,
    held_out_eval_conversations,
    produced_metrics,
    score_during_training,
)
from tuner.models.decoding import decode_whole_characters
from tuner.models.qwenvl import (
    EMA_ADAPTER_DIR,
    add_lora,
    check_lora_targets,
    describe_parameter_groups,
    detect_family,
    enable_gradient_checkpointing,
    load_qwenvl,
    lora_parameter_groups,
    lora_target_modules,
    lora_target_parameters,
    read_config_dict,
    rope_index_of,
    save_adapter,
)
from tuner.models.qwenvl_infer import QwenVLAnswerer
from tuner.models.qwenvl_patches import apply_fast_paths
from tuner.models.qwenvl_serve import write_serve_file
from tuner.recipes.common import open_output_folder, record_run, resolve_base_model
from tuner.runtime.device import resolve_runtime, set_cpu_threads
from tuner.tiny.datasets import resolve_tiny_dataset
from tuner.training.bad_data import admit_dataset
from tuner.training.ema import parameters_replaced
from tuner.training.loop import TrainingJob, run_training, settings_from_config
from tuner.training.metrics import SAMPLES_DIR
from tuner.training.optim import build_lr_scheduler, build_optimizer, lora_plus_groups
from tuner.training.trackers import finish_trackers, log_sample_answers

TASK = "qwenvl-lora"
DEFAULT_TARGETS = ("llm",)
SAMPLE_PROMPTS = 3
SAMPLE_MAX_NEW_TOKENS = 24
EVAL_ANSWERS = "eval_answers.jsonl"  # in samples/: every answer scored during training, with its step
# Samples per length group: neighbours in token length share batches, so padding stays small while
# the order of batches is still shuffled.
LENGTH_GROUP_BATCHES = 8
# Keys this recipe does not read (SDXL's): refused unless left at their defaults. Sample answers come
# from the first training conversations, greedy (output.sample_prompts/sample_steps are SDXL's).
UNUSED_KEYS = (
    "model.variant",
    "model.vae",
    "model.vae_half_precision_safe",
    "model.single_file_config",
    "data.image_column",
    "data.caption_column",
    "data.resolution",
    "data.bucketing",
    "data.bucket_step",
    "data.center_crop",
    "data.random_flip",
    "data.caption_prefix",
    "data.caption_dropout",
    "data.shuffle_tags",
    "data.keep_tags",
    # Repeats, mixed folders and regularisation images are SDXL's (kohya's dataset conventions).
    "data.repeats",
    "data.sources",
    "data.class_prompt",
    "data.prior_loss_weight",
    "data.masked_loss",
    "data.mask_dir",
    "lora.text_encoder",
    "lora.text_encoder_lr",
    # Starting from an existing LoRA file is SDXL's (tuner train sdxl-lora --init-adapter).
    "lora.init_adapter",
    "train.cache",
    "train.cache_dir",
    "train.prediction_type",
    "train.snr_gamma",
    "train.noise_offset",
    "train.pyramid_noise_discount",
    "train.timestep_min",
    "train.timestep_max",
    "train.zero_terminal_snr",
    "train.loss",
    "train.huber_c",
    "train.huber_schedule",
    "data.max_caption_tokens",
    "output.sample_prompts",
    "output.sample_steps",
    "runtime.compile",
    "runtime.channels_last",
)


def train_qwenvl_lora(config: RunConfig, resume: str | None = None) -> Path:
    """Train a LoRA adapter on a Qwen-VL model as `config` says; returns the output folder."""
    check_settings(config)
    output_dir = open_output_folder(config, TASK, resume)
    # The data is checked before any model loads: a refusal costs seconds, not a model load.
    conversations = load_training_conversations(config)
    eval_conversations = (
        held_out_eval_conversations(config.output.eval_data, config.data.path, config.data.image_root)
        if config.output.eval_data
        else []
    )
    set_seed(config.train.seed)
    model_path, base_model = resolve_base_model(config, TASK)
    # Targets the model cannot take (experts on a dense model) are refused before it loads.
    check_lora_targets(
        detect_family(read_config_dict(model_path, config.model.revision)),
        config.lora.targets or DEFAULT_TARGETS,
    )

    runtime = resolve_runtime(config.runtime.device, config.runtime.mixed_precision, config.runtime.devices)
    set_cpu_threads(config.runtime.num_threads)
    strategy = config.runtime.distributed
    accelerator = build_distributed_accelerator(
        runtime,
        config.train.grad_accum,
        output_dir,
        strategy=strategy,
        per_device_batch=config.train.batch_size,
        max_grad_norm=config.optim.max_grad_norm,
    )
    record_run(config, accelerator, output_dir)

    model, processor, family = load_qwenvl(
        model_path,
        dtype=runtime.compute_dtype,
        attention=config.model.attention,
        trust_remote_code=config.model.trust_remote_code,
        allow_pickle=config.model.allow_pickle,
        revision=config.model.revision,
    )
    set_pixel_bounds(processor, min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels)
    video = video_sampling_of(
        processor,
        config.data.video_fps,
        config.data.video_min_frames,
        config.data.video_max_frames,
        config.data.video_max_pixels,
    )
    apply_fast_paths(model, family, runtime.device_type, config.model)
    # Built with the run's processor (its family's boxes, its pixel bounds) and thinking policy.
    eval_samples = eval_prompts(processor, eval_conversations, config.data.thinking)
    check_keep_best_is_produced(config.output.keep_best, eval_samples, config.output.eval_data)

    lora = config.lora
    groups = lora.targets or DEFAULT_TARGETS
    peft_model = add_lora(
        model,
        lora_target_modules(model, family, groups),
        lora.rank,
        lora.alpha,
        lora.dropout,
        lora.init,
        lora.use_rslora,
        target_parameters=lora_target_parameters(model, family, groups),
        variant=lora.variant,
    )
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(peft_model)

    held_out = held_out_indices(len(conversations), config.data.validation_fraction, config.train.seed)
    # The thinking policy applied, and one sample per reply where the template rewrites earlier turns;
    # held-out conversations are split after the hold-out, so no conversation is in both sets.
    print(describe_policy(config.data.thinking))
    train_conversations = TrainingSamples.build(
        processor,
        conversations.select(i for i in range(len(conversations)) if i not in held_out),
        config.data.thinking,
    )
    validation_conversations = TrainingSamples.build(
        processor, conversations.select(sorted(held_out)), config.data.thinking
    )
    lengths = [token_length(processor, conversation, video) for conversation in train_conversations]
    train_conversations, lengths = drop_overlong(
        train_conversations, lengths, config.data.max_length, config.data.overlength
    )
    media = {
        "background": config.data.background,
        "max_image_pixels": config.data.max_image_pixels,
        "video": video,
    }
    dataset = EncodedConversations(
        processor, train_conversations, config.data.max_length, config.data.overlength, **media
    )
    groups = (
        length_groups(lengths, config.train.batch_size) if config.data.group_by_length else [0] * len(lengths)
    )
    batch_sampler = GroupedBatchSampler(
        groups, batch_size=config.train.batch_size, seed=config.train.seed, shuffle=True, drop_last=False
    )
    if config.data.packing and config.model.attention != "flash_attention_2":
        print(
            f"data.packing with attention={config.model.attention}: a mask keeps the samples apart but "
            "attention still spans the whole row; flash_attention_2 attends within each sample"
        )
    pad_token_id = processor.tokenizer.pad_token_id
    collate = (
        collate_vl_packed
        if config.data.packing
        else functools.partial(collate_vl, pad_token_id=pad_token_id, padding_side="right")
    )
    validation_batches = validation_batches_of(
        processor,
        validation_conversations,
        config.data.max_length,
        config.train.batch_size,
        collate,
        **media,
    )

    settings = settings_from_config(config, len(batch_sampler), accelerator.num_processes)
    optim = config.optim
    trainable = lora_plus_groups(
        lora_parameter_groups(peft_model, family, optim.lr, lora.lr_vision, lora.lr_merger),
        [peft_model],
        optim.lr,
        lora.lr_ratio,
    )
    accelerator.print(describe_parameter_groups(trainable))
    optimizer = build_optimizer(
        optim.name, trainable, optim.lr, optim.weight_decay, optim.betas, optim.eps, runtime.device_type
    )
    lr_scheduler = build_lr_scheduler(optimizer, optim.scheduler, optim.warmup_steps, settings.max_steps)

    job = TrainingJob(
        model=peft_model,
        loss_fn=functools.partial(
            causal_lm_loss, dummy_image=dummy_image_inputs(processor), rope_index=rope_index_of(peft_model)
        ),
        dataset=dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        # The loop samples on the main process alone; with sharded weights (ZeRO-3, FSDP) generating
        # would need every process to gather them, so those runs write no sample answers.
        sample_fn=None
        if strategy in ("zero3", "fsdp")
        else functools.partial(
            write_sample_answers,
            peft_model,
            processor,
            train_conversations[:SAMPLE_PROMPTS],
            accelerator,
            **media,
        ),
        validation_batches=validation_batches,
        # output.eval_data: scored as `tuner eval qwenvl` scores (refused with zero3/fsdp in check_settings).
        eval_fn=functools.partial(
            score_during_training,
            QwenVLAnswerer(peft_model, processor, family, accelerator.device),
            eval_samples,
            output_dir / SAMPLES_DIR / EVAL_ANSWERS,
            accelerator.autocast,
            media,
        )
        if eval_samples
        else None,
        save_fn=functools.partial(
            save_outputs,
            peft_model,
            processor,
            accelerator,
            output_dir,
            # The dtype the base ran in: serve.md serves it in the same one, so answers match `tuner infer`.
            {"base_model": base_model, "family": family, "dtype": str(runtime.compute_dtype)},
            config.train.ema_decay,
        ),
        num_workers=config.data.num_workers,
        pin_memory=config.data.pin_memory,
        batch_size_of=samples_in_batch,
        loss_items_of=supervised_tokens,
    )
    try:
        run_training(job, settings, accelerator, output_dir, resume)
    finally:
        finish_trackers(accelerator)  # also when training stops early
    return output_dir


def save_outputs(
    peft_model: torch.nn.Module,
    processor,
    accelerator,
    output_dir: Path,
    metadata: dict[str, str],
    ema_decay: float | None,
    ema_state: dict[str, torch.Tensor] | None,
) -> None:
    """The adapter with its processor, the serve file, and the EMA adapter in `ema/` (the loop's
    `save_fn`, called on every process before the last evaluation)."""
    accelerator.wait_for_everyone()
    # Under ZeRO-3/FSDP each process holds a shard: every process takes part in gathering the weights.
    full_weights = gathered_state_dict(accelerator)
    if accelerator.is_main_process:
        save_adapter(peft_model, output_dir, processor, metadata, state_dict=full_weights)
        write_serve_file(output_dir)
        if ema_state:
            # EMA is refused with ZeRO-3/FSDP (check_settings), so the model holds whole weights here.
            with parameters_replaced(peft_model, ema_state):
                save_adapter(
                    peft_model, output_dir / EMA_ADAPTER_DIR, processor, {**metadata, "ema_decay": ema_decay}
                )


def check_settings(config: RunConfig) -> None:
    """Refuse what this recipe would not honour, before anything is written or loaded."""
    refuse_unused_keys(config, TASK, UNUSED_KEYS)
    check_evaluation_keys(config)
    data = config.data
    VideoSampling(
        data.video_fps,
        data.video_min_frames,
        data.video_max_frames,
        data.video_max_pixels,
        data.min_pixels,
        data.max_pixels,
    ).check()
    save_format = config.output.save_format
    # The default means "the family's own format"; diffusers and kohya files are SDXL's.
    if save_format not in ("peft", RunConfig().output.save_format):
        raise ConfigError(
            f"output.save_format={save_format!r} is an SDXL format; qwenvl-lora writes a PEFT adapter folder",
            hint="set output.save_format to peft, or leave it out",
        )
    if config.output.eval_data and config.runtime.distributed in ("zero3", "fsdp"):
        # Answers are generated on the main process alone, which holds only a shard of the weights.
        raise ConfigError(
            f"output.eval_data does not work with runtime.distributed={config.runtime.distributed}",
            hint="evaluate the saved adapter with `tuner eval qwenvl`, or train with ddp or zero2",
        )
    if config.train.ema_decay is not None and config.runtime.distributed in ("zero3", "fsdp"):
        # Each process holds a shard of the weights, so the average would be of shards, not of the adapter.
        raise ConfigError(
            f"train.ema_decay does not work with runtime.distributed={config.runtime.distributed}",
            hint="leave train.ema_decay unset, or train with runtime.distributed ddp or zero2",
        )


def check_keep_best_is_produced(
    keep_best: str | None, eval_samples: Sequence[Prompt], eval_data: str | None
) -> None:
    """Refuse an `output.keep_best=eval/<metric>` that scoring `eval_samples` never produces: it would
    never keep a checkpoint. Which metrics a sample gets follows its reference (`metrics_for`)."""
    if keep_best is None or not keep_best.startswith("eval/") or not eval_samples:
        return
    produced = produced_metrics(eval_samples)
    if keep_best.removeprefix("eval/") not in produced:
        raise ConfigError(
            f"output.keep_best={keep_best}: the references of output.eval_data {eval_data} are scored "
            f"with {', '.join(sorted(produced))}, so it is never measured",
            hint=f"keep the best of one of eval/{', eval/'.join(sorted(produced))}; box metrics need "
            "references with boxes, choice_accuracy references that are an option letter",
        )


def load_training_conversations(config: RunConfig) -> ConversationRecords:
    """Every usable conversation; bad records stop the run unless `data.skip_bad` allows a few, and
    duplicates are reported as warnings."""
    data = config.data
    path = resolve_tiny_dataset(data.path, TASK)
    scan = load_conversations(
        path, data.image_root, check_images=True, max_image_pixels=data.max_image_pixels
    )
    # Duplicates train (as kohya and diffusers would train them) but are worth a warning.
    warnings = duplicate_conversations(scan.conversations)
    report = DataReport(
        "qwenvl", str(path), len(scan.conversations), scan.problems, stats={}, histogram="", warnings=warnings
    )
    admit_dataset(
        report,
        Path(config.output.dir),
        data.skip_bad,
        data.max_bad_fraction,
        main_process=launched_rank() == 0,
    )
    return scan.conversations


def drop_overlong(
    conversations: ConversationRecords | TrainingSamples, lengths: list[int], max_length: int, overlength: str
) -> tuple[ConversationRecords | TrainingSamples, list[int]]:
    """Drop conversations longer than `max_length` tokens (with `overlength: drop`), saying how many."""
    if overlength != "drop":
        return conversations, [min(length, max_length) for length in lengths]
    kept = [index for index, length in enumerate(lengths) if length <= max_length]
    dropped = len(conversations) - len(kept)
    if not kept:
        raise DataError(
            f"all {len(conversations)} conversations are longer than data.max_length={max_length} tokens "
            f"(shortest: {min(lengths)})",
            hint="raise data.max_length, lower data.max_pixels (videos: data.video_max_pixels), or set "
            "data.overlength to truncate",
        )
    if dropped:
        print(
            f"dropped {dropped} of {len(conversations)} conversations longer than {max_length} tokens "
            "(raise data.max_length or lower data.max_pixels to keep them)"
        )
    return conversations.select(kept), [lengths[index] for index in kept]


def length_groups(lengths: Sequence[int], batch_size: int) -> list[int]:
    """A group id per sample: samples ranked by token length, in runs of LENGTH_GROUP_BATCHES batches."""
    group_size = batch_size * LENGTH_GROUP_BATCHES
    ranked = sorted(range(len(lengths)), key=lambda index: lengths[index])
    groups = [0] * len(lengths)
    for rank, index in enumerate(ranked):
        groups[index] = rank // group_size
    return groups


class EncodedConversations(torch.utils.data.Dataset):
    """Conversations encoded (images resized, tokens and labels built) when a batch asks for them."""

    def __init__(
        self,
        processor,
        conversations: Sequence[Conversation],
        max_length: int,
        overlength: str,
        *,
        background: tuple[int, int, int] = (255, 255, 255),
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        video: VideoSampling | None = None,
    ) -> None:
        self.processor = processor
        self.conversations = conversations
        self.max_length = max_length
        self.overlength = overlength
        self.images = {"background": background, "max_image_pixels": max_image_pixels, "video": video}

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> EncodedSample:
        conversation = self.conversations[index]
        sample = encode_conversation(
            self.processor, conversation, self.max_length, self.overlength, **self.images
        )
        if sample is None:
            # Lengths were measured before training; only a file changed mid-run gets here.
            raise DataError(
                f"{conversation.source}: longer than data.max_length={self.max_length} tokens",
                hint="the data changed during training; restart the run",
            )
        return sample


def validation_batches_of(
    processor,
    conversations: Sequence[Conversation],
    max_length: int,
    batch_size: int,
    collate,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    video: VideoSampling | None = None,
) -> list[dict] | None:
    if not conversations:
        return None
    images = {"background": background, "max_image_pixels": max_image_pixels, "video": video}
    samples = [encode_conversation(processor, c, max_length, "truncate", **images) for c in conversations]
    samples = [sample for sample in samples if sample is not None]
    return [collate(samples[start : start + batch_size]) for start in range(0, len(samples), batch_size)]


def causal_lm_loss(
    model: torch.nn.Module,
    batch: dict,
    dummy_image: dict | None = None,
    rope_index: RopeIndex | None = None,
) -> torch.Tensor:
    """The model's own shifted cross-entropy, summed over the batch's supervised tokens.

    A packed batch (`data.packing`) gets its per-sample position ids from `rope_index`, the model's
    own M-RoPE function (see `packed_model_inputs`).

    A batch without images or videos skips the vision tower. In a multi-process run another process's
    batch may have one, and then the processes disagree on which weights take part in the step: DDP
    waits forever for the vision LoRA gradients, ZeRO-3/FSDP for the vision weights' all-gather. So a
    text-only batch also runs `dummy_image` (see `dummy_image_inputs`) through the vision tower, times
    zero: every process runs the same modules, and the loss and gradients do not change.
    """
    if SAMPLE_LENGTHS in batch:
        if rope_index is None:
            raise ConfigError("a packed batch needs the model's rope_index to place its samples")
        batch = packed_model_inputs(batch, rope_index)
    # num_items_in_batch=1: transformers then sums the token losses (and divides by 1); the loop
    # divides by the supervised tokens of the whole step (`supervised_tokens`).
    loss = model(**{**batch, "use_cache": False, "num_items_in_batch": 1}).loss
    if dummy_image is not None and "pixel_values" not in batch and "pixel_values_videos" not in batch:
        # DDP / DeepSpeed wrap the PEFT model in `.module`; PEFT forwards the call to the base model.
        inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
        device = batch["input_ids"].device
        features = inner.get_image_features(
            pixel_values=dummy_image["pixel_values"].to(device),
            image_grid_thw=dummy_image["image_grid_thw"].to(device),
        )
        loss = loss + 0.0 * sum(tensor.float().sum() for tensor in _float_tensors(features))
    return loss


def supervised_tokens(batch: dict) -> int:
    """The tokens a batch's loss is taken on: labels other than -100 after the causal shift."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def dummy_image_inputs(processor) -> dict[str, torch.Tensor]:
    """Vision-tower inputs (`pixel_values`, `image_grid_thw`) of the smallest image the processor makes."""
    # Any size: the processor scales it up to its min_pixels bound.
    inputs = processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def _float_tensors(value: object) -> Iterator[torch.Tensor]:
    """Every float tensor in a model output: Qwen3-VL returns DeepStack features beside the merged image
    embeddings, each from its own (possibly trainable) merger."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, Mapping | list | tuple):
        for item in value.values() if isinstance(value, Mapping) else value:
            yield from _float_tensors(item)


def write_sample_answers(
    peft_model: torch.nn.Module,
    processor,
    conversations: Sequence[Conversation],
    accelerator,
    step: int,
    samples_dir: Path,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    video: VideoSampling | None = None,
) -> None:
    """Greedy answers to a few training samples (their conversation up to the last reply, as
    `tuner eval qwenvl` asks it), appended to answers.jsonl with the reference they train towards.

    The samples already have the thinking policy applied. The loop calls this on the main process, in
    eval mode under no_grad.
    """
    device = next(peft_model.parameters()).device
    records = []
    for conversation in conversations:
        prompt = build_prompt(processor, conversation)
        inputs = model_inputs(
            processor, [prompt], background=background, max_image_pixels=max_image_pixels, video=video
        ).to(device)
        with accelerator.autocast():
            generated = peft_model.generate(
                **inputs, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False, use_cache=True
            )
        new_tokens = generated[0, inputs["input_ids"].shape[1] :]
        records.append(
            {
                "step": step,
                "source": conversation.source,
                "question": prompt.question,
                "reference": prompt.reference,
                "answer": decode_whole_characters(processor, new_tokens, skip_special_tokens=True),
            }
        )
    with open(Path(samples_dir) / "answers.jsonl", "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    log_sample_answers(accelerator, step, records)
