"""Qwen-VL inference: answer an image question with a base model, optionally with a LoRA adapter on top.

Loading goes through the same code as training (`load_qwenvl`, the `tiny` aliases, `resolve_model_source`)
and adapters through `load_adapter_checked`, after a check that the adapter was made for this kind of
model. When the adapter folder holds a processor (tuner saves the training processor beside every
adapter), that processor is used: it carries the chat template and pixel bounds the adapter was
trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoProcessor, PreTrainedModel, ProcessorMixin

from tuner.data.conversations import Conversation, load_conversations
from tuner.data.grounding import (
    AnswerBox,
    box_style,
    draw_boxes,
    parse_answer_boxes,
    resized_size,
)
from tuner.data.images import load_image_rgb
from tuner.data.prompts import build_prompt, model_inputs, prompt_of, scored_answer
from tuner.data.video import VideoSource
from tuner.data.vl_encoding import set_pixel_bounds
from tuner.errors import ConfigError, DataError, ModelError
from tuner.models.decoding import decode_whole_characters
from tuner.models.qwenvl import (
    ADAPTER_METADATA_FILE,
    detect_family,
    load_adapter_checked,
    load_qwenvl,
    read_config_dict,
)
from tuner.runtime.device import Runtime
from tuner.tiny import resolve_model_path
from tuner.tiny.datasets import resolve_tiny_dataset

TASK = "qwenvl-lora"
DEFAULT_MAX_NEW_TOKENS = 128
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Files whose presence means a folder holds a saved processor (transformers 5 writes processor_config.json
# with the image and video processor inside; older saves wrote preprocessor_config.json).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
PROBLEMS_SHOWN = 10
# Where a reply decoded with its special tokens ends.
END_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class QwenVLAnswerer:
    """A model (base, or base + adapter) with its processor, ready to answer prompts."""

    model: PreTrainedModel | PeftModel
    processor: ProcessorMixin
    family: str
    device: torch.device


def resolve_qwenvl_model(
    name_or_path: str, source: str = "huggingface", offline: bool = False, revision: str | None = None
) -> str:
    """Where to load a Qwen-VL model from: a built tiny model for `tiny`/`tiny-<name>`, else the hub/local."""
    return resolve_model_path(name_or_path, TASK, source, offline, revision)


def read_adapter_record(adapter_dir: str | Path) -> dict[str, Any]:
    """`tuner_adapter.json` of an adapter folder (base model, family, versions); {} for a foreign adapter."""
    record_file = Path(adapter_dir) / ADAPTER_METADATA_FILE
    if not record_file.is_file():
        return {}
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(
            f"cannot read {record_file}: {error}",
            hint="restore the file from the training output, or delete it to skip tuner's base-model check",
        ) from error
    if not isinstance(record, dict):
        raise ModelError(f"{record_file} is not a JSON object", hint="restore it from the training output")
    return record


def recorded_base_model(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on, from tuner's record or PEFT's adapter_config.json."""
    base = read_adapter_record(adapter_dir).get("base_model")
    if base:
        return str(base)
    config_file = Path(adapter_dir) / "adapter_config.json"
    if config_file.is_file():
        try:
            return json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    return None


def check_adapter_family(adapter_dir: str | Path, family: str, base: str) -> None:
    """Refuse an adapter whose recorded model family is not `family` (read from config files only)."""
    record = read_adapter_record(adapter_dir)
    recorded = record.get("family")
    if recorded is not None and recorded != family:
        raise ModelError(
            f"adapter {adapter_dir} was trained on a {recorded} model ({record.get('base_model', '?')}) "
            f"but {base} is a {family} model",
            hint="use the base model it was trained on: "
            + str(record.get("base_model", "see tuner_adapter.json")),
        )


def check_adapter_shapes(base_model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose LoRA matrices do not fit the base model's layers (another model size).

    peft 0.21 loads the adapter with `load_state_dict`, which stops at the first size mismatch with a
    RuntimeError; checking the file's header first names the layer and both shapes.
    """
    weights_file = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        return
    modules = dict(base_model.named_modules())
    with safe_open(str(weights_file), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
            # PEFT saves `base_model.model.<module>.lora_A.weight` (the adapter name removed).
            module_name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
            module = modules.get(module_name)
            if not isinstance(module, torch.nn.Linear) or kind not in ("A.weight", "B.weight"):
                continue  # names that fit no layer are load_adapter_checked's to report
            shape = tuple(weights.get_slice(key).get_shape())
            fits = shape[1] == module.in_features if kind == "A.weight" else shape[0] == module.out_features
            if not fits:
                raise ModelError(
                    f"adapter {adapter_dir} does not fit this model: {key} has shape {list(shape)} but "
                    f"{module_name} is a {module.in_features} -> {module.out_features} layer",
                    hint="the adapter was trained on a model of another size; use the base model it was "
                    "trained on (see tuner_adapter.json or adapter_config.json)",
                )


def apply_adapter(base_model: PreTrainedModel, family: str, base: str, adapter_dir: str | Path) -> PeftModel:
    """`base_model` with the adapter loaded, after refusing one made for another family or size."""
    check_adapter_family(adapter_dir, family, base)
    check_adapter_shapes(base_model, adapter_dir)
    return load_adapter_checked(base_model, adapter_dir)


def load_processor_of(folder: str | Path) -> ProcessorMixin | None:
    """The processor saved in `folder`, or None when the folder holds none."""
    if not any((Path(folder) / name).is_file() for name in PROCESSOR_FILES):
        return None
    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the processor saved in {folder}: {error}",
            hint="the folder needs the tokenizer, processor_config.json and chat template files",
        ) from error


def load_answerer(
    model: str | None,
    runtime: Runtime,
    adapter: str | Path | None = None,
    *,
    max_pixels: int | None = None,
    attention: str = "sdpa",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    hub_source: str = "huggingface",
    offline: bool = False,
) -> QwenVLAnswerer:
    """Load `model` (default: the adapter's recorded base) in the runtime's precision, plus `adapter`."""
    if model is None:
        model = recorded_base_model(adapter) if adapter is not None else None
        if model is None:
            raise ConfigError(
                "no model given" + (f" and adapter {adapter} records no base model" if adapter else ""),
                hint="pass --model with a hub ID, a local folder or tiny",
            )
    model_path = resolve_qwenvl_model(model, hub_source, offline, revision)
    if adapter is not None:
        check_adapter_family(adapter, detect_family(read_config_dict(model_path, revision)), model)
    base_model, processor, family = load_qwenvl(
        model_path,
        dtype=runtime.compute_dtype,
        attention=attention,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        revision=revision,
    )
    loaded: PreTrainedModel | PeftModel = base_model
    if adapter is not None:
        loaded = apply_adapter(base_model, family, model, adapter)
        processor = load_processor_of(adapter) or processor
    if max_pixels is not None:
        min_pixels = min(processor.image_processor.size["shortest_edge"], max_pixels)
        set_pixel_bounds(processor, min_pixels=min_pixels, max_pixels=max_pixels)
    device = torch.device(runtime.device_type)
    loaded.to(device).eval()
    return QwenVLAnswerer(model=loaded, processor=processor, family=family, device=device)


def generate_answer(
    answerer: QwenVLAnswerer,
    messages: list[dict],
    images: Sequence[Path] = (),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    skip_special_tokens: bool = True,
    videos: Sequence[VideoSource] = (),
) -> str:
    """The model's reply to `messages` (chat format, one `{"type": "image"}` part per entry of `images`
    and one `{"type": "video"}` part per entry of `videos`, sampled as training samples them).

    Greedy when `temperature` is 0, sampled at `temperature` otherwise. `skip_special_tokens=False`
    keeps special tokens such as Qwen2-VL's `<|box_start|>` (the reply ends before `<|im_end|>`).
    """
    if temperature < 0:
        raise ConfigError(f"temperature {temperature} is negative", hint="use 0 for greedy answers, or > 0")
    if max_new_tokens < 1:
        raise ConfigError(f"max new tokens {max_new_tokens} is below 1", hint="use e.g. --max-new-tokens 128")
    processor = answerer.processor
    inputs = model_inputs(processor, [prompt_of(processor, messages, images, videos)]).to(answerer.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        generated = answerer.model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    answer = decode_whole_characters(
        processor, generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=skip_special_tokens
    )
    for end in END_TOKENS:
        answer = answer.split(end)[0]
    return answer


def answer_with_boxes(
    answerer: QwenVLAnswerer,
    prompt: str,
    image: Path,
    out: Path,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
) -> tuple[str, list[AnswerBox]]:
    """The answer to a question about one image, and the boxes in it drawn on the image into `out`.

    Boxes are read in either written form and mapped back to pixels of the input image by the family's
    convention (see tuner.data.grounding).
    """
    answer = generate_answer(
        answerer, prompt_messages(prompt, 1), [image], max_new_tokens, temperature, skip_special_tokens=False
    )
    picture = load_image_rgb(image)
    size = picture.size
    processor = answerer.processor
    boxes = parse_answer_boxes(answer, box_style(processor), size, resized_size(processor, *size))
    draw_boxes(picture, boxes, out)
    return answer, boxes


def prompt_messages(prompt: str, image_count: int, video_count: int = 0) -> list[dict]:
    """One user turn: the images and videos first, then the question (the layout Qwen-VL models are
    tuned on)."""
    media = [{"type": "image"}] * image_count + [{"type": "video"}] * video_count
    return [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]


def answer_prompt(
    answerer: QwenVLAnswerer,
    prompt: str,
    images: Sequence[Path],
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    videos: Sequence[VideoSource] = (),
) -> str:
    """The answer to one question about `images` and `videos`."""
    messages = prompt_messages(prompt, len(images), len(videos))
    return generate_answer(answerer, messages, images, max_new_tokens, temperature, videos=videos)


def answer_dataset(
    answerer: QwenVLAnswerer,
    data: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
) -> int:
    """Answer every conversation of a training-format dataset (`tiny`: the generated one); returns the count.

    Prompt and reference come from `tuner.data.prompts.build_prompt`, as `tuner eval qwenvl` builds
    them: the conversation up to its last reply, and that reply's final answer (boxes written in the
    family's convention, no `<think>` block). Each line of `out` (JSONL) holds `source`, `question`
    (the last user turn's text), `reference` and `answer` (and `final_answer`, the part after the
    reasoning, when the answer reasoned); lines are written as answers come, so a long run can be
    watched and an interrupted one keeps what it finished.
    """
    conversations = checked_conversations(data, image_root)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(_answer_record(answerer, conversation, max_new_tokens, temperature)))
            handle.write("\n")
            handle.flush()
    return len(conversations)


def checked_conversations(data: str | Path, image_root: str | Path | None) -> Sequence[Conversation]:
    """Every conversation of `data` (`tiny`: the generated set); any bad record stops with a DataError."""
    data = resolve_tiny_dataset(str(data), TASK)
    scan = load_conversations(data, image_root, check_images=True)
    if scan.problems:
        shown = "\n".join(f"  {problem}" for problem in scan.problems[:PROBLEMS_SHOWN])
        more = len(scan.problems) - PROBLEMS_SHOWN
        raise DataError(
            f"{len(scan.problems)} problem(s) in {data}:\n{shown}"
            + (f"\n  ... and {more} more" if more > 0 else ""),
            hint=f"run `tuner data check qwenvl {data}` and fix the records listed",
        )
    return scan.conversations


def _answer_record(
    answerer: QwenVLAnswerer, conversation: Conversation, max_new_tokens: int, temperature: float
) -> dict[str, str]:
    """The record's answer beside its reference, both as `tuner eval qwenvl` scores them."""
    prompt = build_prompt(answerer.processor, conversation)
    answer = generate_answer(
        answerer, prompt.messages, prompt.images, max_new_tokens, temperature, videos=prompt.videos
    )
    record = {"source": prompt.source, "question": prompt.question, "reference": prompt.reference}
    final = scored_answer(answer, prompt)
    # The answer after its reasoning, beside the whole answer, as tuner eval writes it.
    return record | {"answer": answer} | ({"final_answer": final} if final != answer.strip() else {})
