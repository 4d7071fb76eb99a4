"""`tuner eval qwenvl`: answer an eval set with the base model and each adapter, and score the answers.

Answers are greedy and batched (left padding, prompts of similar length together), with the processor
and chat template the adapter was trained with (`load_processor_of`). Each record's prompt, media and
reference come from `tuner.data.prompts.build_prompt`, as training samples and `tuner infer qwenvl
--data` get them: the prompt is everything before the last reply, the reference is that reply's final
answer (boxes in the family's convention, no `<think>` block), and an answer is scored on its final
answer. The same scoring runs during training (`output.eval_data`).

An eval sample whose prompt and images also appear in an adapter's training data is refused (or, with
`allow_overlap`, counted and reported loudly): scoring on training samples rewards memorisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tuner.config.load import RESOLVED_CONFIG_NAME
from tuner.data.conversations import Conversation, load_conversations
from tuner.data.prompts import Prompt, build_prompt, model_inputs, scored_answer
from tuner.data.video import frame_files
from tuner.data.vl_encoding import set_pixel_bounds
from tuner.errors import ConfigError, DataError
from tuner.eval.metrics import METRICS, metrics_for, score_answer
from tuner.models.decoding import decode_whole_characters
from tuner.models.qwenvl_infer import (
    QwenVLAnswerer,
    apply_adapter,
    checked_conversations,
    load_answerer,
    load_processor_of,
    recorded_base_model,
)
from tuner.runtime.device import Runtime
from tuner.tiny.datasets import resolve_tiny_dataset, resolve_tiny_eval_set

TASK = "qwenvl-lora"
EVAL_FILE = "eval.json"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 64
# In-training evaluation generates at most this many tokens per answer, reasoning included.
MAX_EVAL_NEW_TOKENS = 4 * DEFAULT_MAX_NEW_TOKENS
WORST_SHOWN = 5
OVERLAP_SHOWN = 3


@dataclass
class ModelResult:
    """One model's answers and scores: `metrics` are means over the samples that have each metric;
    `overall` is the mean of every sample's headline score (its first metric)."""

    name: str
    adapter: str | None
    answers: list[dict[str, Any]]
    metrics: dict[str, float]
    overall: float
    overlap: int = 0  # eval samples found in this adapter's training data

    def worst(self, count: int = WORST_SHOWN) -> list[dict[str, Any]]:
        # Ties on the headline score (often 0/1) are broken by the mean of the sample's other scores.
        def rank(answer: dict[str, Any]) -> tuple[float, float]:
            return answer["score"], sum(answer["scores"].values()) / len(answer["scores"])

        return sorted(self.answers, key=rank)[:count]


@dataclass
class EvalReport:
    data: str
    samples: int
    models: list[ModelResult] = field(default_factory=list)

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for model in self.models:
            names += [name for name in model.metrics if name not in names]
        return names


def load_eval_conversations(data: str | Path, image_root: str | Path | None = None) -> Sequence[Conversation]:
    """The records of `data`, every one checked; `tiny` is the held-out questions of the tiny dataset."""
    return checked_conversations(resolve_tiny_eval_set(str(data)), image_root)


def eval_prompts(processor, conversations: Iterable[Conversation], thinking: str = "keep") -> list[Prompt]:
    """Each record's prompt and reference for `processor` (its family's boxes, its pixel bounds)."""
    return [build_prompt(processor, conversation, thinking) for conversation in conversations]


def produced_metrics(prompts: Iterable[Prompt]) -> set[str]:
    """The metrics automatic scoring gives these prompts' answers, `overall` included."""
    return {"overall"}.union(*(metrics_for(prompt.reference) for prompt in prompts))


def sample_fingerprint(conversation: Conversation, end: int) -> str:
    """A hash of the turns `conversation.messages[:end]` and the bytes of the images and videos they
    show: equal for the same question on the same pictures and clips, whatever the files are called.
    Missing files are left out (the training data is not checked here)."""
    prompt = conversation.messages[:end]
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode())
    parts = [part["type"] for message in prompt for part in message["content"]]
    videos = conversation.videos[: parts.count("video")]
    files = [*conversation.images[: parts.count("image")]]
    files += [file for video in videos for file in frame_files(video) or (Path(video),)]
    for file in files:
        if Path(file).is_file():
            with open(file, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def training_data_of(adapter_dir: str | Path) -> tuple[str, str | None] | None:
    """(data.path, data.image_root) from the `tuner_config.yaml` beside an adapter, or None."""
    config_file = Path(adapter_dir) / RESOLVED_CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        data = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, yaml.YAMLError):
        return None
    return (str(data["path"]), data.get("image_root")) if data.get("path") else None


def overlapping_samples(samples: Sequence[Conversation], data: str, image_root: str | None) -> list[str]:
    """The sources of the eval records whose prompt and images are also in the training data `data`."""
    path = resolve_tiny_dataset(data, TASK)
    if not Path(path).exists():
        print(
            f"warning: cannot check the eval data against the training data {path}: it is not here",
            file=sys.stderr,
        )
        return []
    scan = load_conversations(path, image_root, check_images=False)
    seen = set()
    for conversation in scan.conversations:
        # A training record may end in several answers; any prompt prefix that ends on a user turn counts.
        for end, message in enumerate(conversation.messages):
            if message["role"] == "assistant":
                seen.add(sample_fingerprint(conversation, end))
    return [s.source for s in samples if sample_fingerprint(s, len(s.messages) - 1) in seen]


def check_overlap(
    samples: Sequence[Conversation], adapter_dir: str | Path, eval_data: str, allow_overlap: bool
) -> int:
    """Refuse eval samples that the adapter trained on (or, with `allow_overlap`, warn); returns how many."""
    training = training_data_of(adapter_dir)
    if training is None:
        return 0
    found = overlapping_samples(samples, *training)
    if not found:
        return 0
    listed = ", ".join(found[:OVERLAP_SHOWN]) + (" ..." if len(found) > OVERLAP_SHOWN else "")
    message = (
        f"{len(found)} of {len(samples)} samples of {eval_data} are in the training data of {adapter_dir} "
        f"({training[0]}): {listed}"
    )
    if not allow_overlap:
        raise DataError(
            message,
            hint="evaluate on held-out samples (scores on training samples reward memorisation), or pass "
            "--allow-overlap to score them anyway",
        )
    print(f"WARNING: {message}; scores on these samples reward memorisation", file=sys.stderr)
    return len(found)


def answer_samples(
    answerer: QwenVLAnswerer,
    samples: Sequence[Prompt],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    media: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy answers, in the order of `samples`, `batch_size` prompts of similar length at a time.

    `media` are `model_inputs` options (background, max_image_pixels, video); `autocast` wraps
    generation (training passes the Accelerator's, for its mixed precision).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} is below 1", hint="use e.g. --batch-size 8")
    processor = answerer.processor
    order = sorted(range(len(samples)), key=lambda index: len(samples[index].text))
    answers = [""] * len(samples)
    tokenizer = processor.tokenizer
    # Generation appends after the last position, so a batch of prompts is padded on the left.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            inputs = model_inputs(processor, [samples[i] for i in chosen], **(media or {}))
            inputs = inputs.to(answerer.device)
            with torch.inference_mode(), autocast():
                generated = answerer.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            for index, tokens in zip(chosen, new_tokens, strict=True):
                answers[index] = decode_whole_characters(processor, tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return answers


def score_samples(
    name: str,
    samples: Sequence[Prompt],
    answers: Sequence[str],
    metrics: Sequence[str] | None = None,
    adapter: str | None = None,
) -> ModelResult:
    """Score each answer's final answer (`scored_answer`; `metrics` None: chosen per sample from its
    reference) and average."""
    unknown = [metric for metric in metrics or () if metric not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}", hint=f"choose from {', '.join(METRICS)}")
    records, totals, counts = [], {}, {}
    for sample, answer in zip(samples, answers, strict=True):
        final = scored_answer(answer, sample)
        scores = score_answer(final, [sample.reference], metrics)
        for metric, value in scores.items():
            totals[metric] = totals.get(metric, 0.0) + value
            counts[metric] = counts.get(metric, 0) + 1
        record = {"source": sample.source, "question": sample.question, "reference": sample.reference}
        record["answer"] = answer
        if final != answer.strip():
            record["final_answer"] = final  # what was scored: the answer after its reasoning
        records.append(record | {"scores": scores, "score": next(iter(scores.values()))})
    means = {metric: totals[metric] / counts[metric] for metric in totals}
    overall = sum(record["score"] for record in records) / len(records) if records else 0.0
    return ModelResult(name, adapter, records, means, overall)


def held_out_eval_conversations(
    eval_data: str, training_data: str, image_root: str | Path | None = None
) -> Sequence[Conversation]:
    """The records of `eval_data` for evaluation during training (`output.eval_data`); refused when any
    of them is also in `training_data` (there is no --allow-overlap here: the scores would steer which
    checkpoint is kept towards memorisation)."""
    samples = load_eval_conversations(eval_data, image_root)
    found = overlapping_samples(samples, training_data, str(image_root) if image_root else None)
    if found:
        listed = ", ".join(found[:OVERLAP_SHOWN]) + (" ..." if len(found) > OVERLAP_SHOWN else "")
        raise DataError(
            f"output.eval_data {eval_data}: {len(found)} of {len(samples)} samples are also in the training "
            f"data {training_data}: {listed}",
            hint="evaluate on held-out samples: remove them from one of the two files",
        )
    return samples


def answer_budget(processor, samples: Sequence[Prompt], margin: int = 8) -> int:
    """New tokens enough for the longest reply as it trains (its reasoning too) plus `margin`: an answer
    far longer than every reply scores badly anyway, and an untrained model would otherwise generate
    up to the limit."""
    longest = max((len(processor.tokenizer(s.reply)["input_ids"]) for s in samples), default=0)
    return min(longest + margin, MAX_EVAL_NEW_TOKENS)


def score_during_training(
    answerer: QwenVLAnswerer,
    samples: Sequence[Prompt],
    answers_file: Path,
    autocast: Callable[[], contextlib.AbstractContextManager],
    media: dict[str, Any],
    step: int,
) -> dict[str, float]:
    """The loop's `eval_fn`: answer and score `samples` as `tuner eval qwenvl` does, append every scored
    answer (with its step) to `answers_file`, and return the metric means and `overall`."""
    max_new_tokens = answer_budget(answerer.processor, samples)
    answers = answer_samples(answerer, samples, max_new_tokens=max_new_tokens, autocast=autocast, media=media)
    result = score_samples(f"step {step}", samples, answers)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    with open(answers_file, "a", encoding="utf-8") as handle:
        for answer in result.answers:
            handle.write(json.dumps({"step": step, **answer}, ensure_ascii=False) + "\n")
    return {**result.metrics, "overall": result.overall}


def evaluate_qwenvl(
    data: str | Path,
    runtime: Runtime,
    adapters: Sequence[str | Path] = (),
    model: str | None = None,
    *,
    include_base: bool = True,
    image_root: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_pixels: int | None = None,
    allow_overlap: bool = False,
    load_options: dict[str, Any] | None = None,
) -> EvalReport:
    """Answer and score `data` with the base model and each adapter; the base loads once and each adapter
    is put on and taken off it again (PEFT `unload`). Prompts and references are built for each model's
    processor (an adapter's own pixel bounds place Qwen2.5-VL's boxes)."""
    if not adapters and not include_base:
        raise ConfigError("nothing to evaluate: --no-base without any --adapter", hint="add --adapter DIR")
    conversations = load_eval_conversations(data, image_root)
    overlaps = {
        str(adapter): check_overlap(conversations, adapter, str(data), allow_overlap) for adapter in adapters
    }
    if model is None and adapters:
        model = recorded_base_model(adapters[0])
    answerer = load_answerer(model, runtime, max_pixels=max_pixels, **(load_options or {}))
    report = EvalReport(str(data), len(conversations))
    options = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    if include_base:
        print(f"answering {len(conversations)} samples with the base model {model}")
        samples = eval_prompts(answerer.processor, conversations)
        report.models.append(
            score_samples("base", samples, answer_samples(answerer, samples, **options), metrics)
        )
    base_model, base_processor = answerer.model, answerer.processor
    for adapter in adapters:
        print(f"answering {len(conversations)} samples with adapter {adapter}")
        peft_model = apply_adapter(base_model, answerer.family, str(model), adapter)
        processor = load_processor_of(adapter) or base_processor
        if max_pixels is not None:
            set_pixel_bounds(
                processor,
                min_pixels=min(processor.image_processor.size["shortest_edge"], max_pixels),
                max_pixels=max_pixels,
            )
        peft_model.to(answerer.device).eval()
        adapted = QwenVLAnswerer(peft_model, processor, answerer.family, answerer.device)
        samples = eval_prompts(processor, conversations)
        result = score_samples(
            _adapter_name(adapter, adapters), samples, answer_samples(adapted, samples, **options), metrics
        )
        result.adapter, result.overlap = str(adapter), overlaps[str(adapter)]
        report.models.append(result)
        base_model = peft_model.unload()  # the LoRA layers out again: the next adapter starts from the base
    return report


def _adapter_name(adapter: str | Path, adapters: Sequence[str | Path]) -> str:
    """The folder name, or the whole path where two adapters share a folder name."""
    names = [Path(a).name for a in adapters]
    return Path(adapter).name if names.count(Path(adapter).name) == 1 else str(adapter)


def write_report(report: EvalReport, out: str | Path) -> Path:
    """`out/eval.json` (scores, worst samples) and `out/answers-<model>.jsonl` (every answer, scored)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = []
    for index, result in enumerate(report.models):
        answers_file = f"answers-{index}-{_file_safe(result.name)}.jsonl"
        with open(out / answers_file, "w", encoding="utf-8") as handle:
            for answer in result.answers:
                handle.write(json.dumps(answer, ensure_ascii=False) + "\n")
        models.append(
            {
                "name": result.name,
                "adapter": result.adapter,
                "metrics": result.metrics,
                "overall": result.overall,
                "overlap": result.overlap,
                "answers": answers_file,
                "worst": result.worst(),
            }
        )
    record = {
        "data": report.data,
        "samples": report.samples,
        "metrics": report.metric_names(),
        "models": models,
    }
    path = out / EVAL_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def _file_safe(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)[:60]


def format_table(report: EvalReport) -> str:
    """Metrics in rows, models in columns, then the worst-scored samples of each model."""
    names = [model.name for model in report.models]
    width = max([len("overall"), *(len(metric) for metric in report.metric_names())])
    columns = [max(len(name), 7) for name in names]
    lines = [f"{report.samples} samples of {report.data}", ""]
    lines.append(
        " " * width + "  " + "  ".join(name.rjust(w) for name, w in zip(names, columns, strict=True))
    )
    for metric in [*report.metric_names(), "overall"]:
        cells = []
        for model, w in zip(report.models, columns, strict=True):
            value = model.overall if metric == "overall" else model.metrics.get(metric)
            cells.append(("-" if value is None else f"{value:.3f}").rjust(w))
        lines.append(metric.ljust(width) + "  " + "  ".join(cells))
    for model in report.models:
        lines += ["", f"worst samples, {model.name}:"]
        for answer in model.worst():
            lines.append(
                f"  {answer['score']:.2f}  {Path(answer['source']).name}: {_short(answer['question'])} -> "
                f"{_short(answer['answer'])!r} (reference {_short(answer['reference'])!r})"
            )
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
