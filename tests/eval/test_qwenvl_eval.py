"""`tuner eval qwenvl`: batched answers equal one-at-a-time answers, scores, the overlap refusal, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from cli_runner import run_cli
from PIL import Image
from videos import write_frame_folder, write_video

from tuner.data.prompts import Prompt
from tuner.errors import DataError
from tuner.eval.metrics import score_answer
from tuner.eval.qwenvl import (
    answer_samples,
    check_overlap,
    eval_prompts,
    load_eval_conversations,
    score_samples,
)
from tuner.models.qwenvl import add_lora, load_qwenvl, lora_target_modules, save_adapter
from tuner.models.qwenvl_infer import QwenVLAnswerer, generate_answer
from tuner.tiny.datasets import resolve_tiny_dataset

MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """A saved Qwen2.5-VL adapter with random non-zero LoRA weights, and the in-memory model."""
    model, processor, family = load_qwenvl(str(tiny_model("qwen2.5-vl")), dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = add_lora(model, lora_target_modules(model, family, ("llm",)), rank=4, alpha=8)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(peft_model, folder, processor, {"base_model": "tiny-qwen2.5-vl", "family": family})
    return folder, QwenVLAnswerer(peft_model.eval(), processor, family, torch.device("cpu"))


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Four questions of different lengths, one text-only, with images of two sizes."""
    folder = tmp_path_factory.mktemp("eval")
    Image.new("RGB", (56, 84), (220, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (84, 56), (30, 60, 220)).save(folder / "blue.png")
    records = [
        ("<image>What colour is this?", "Red.", ["red.png"]),
        ("Name a colour, any colour you like, in one word please.", "Blue.", []),
        ("<image>Which option is right? A: red B: blue", "B", ["blue.png"]),
        ("<image>Where is the shape?", '{"bbox_2d": [0, 0, 28, 28]}', ["red.png"]),
    ]
    with open(folder / "eval.jsonl", "w", encoding="utf-8") as handle:
        for question, answer, images in records:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages, "images": images}) + "\n")
    return folder / "eval.jsonl"


def test_batched_answers_equal_single_answers(adapter, eval_file):
    _, answerer = adapter
    samples = eval_prompts(answerer.processor, load_eval_conversations(eval_file))
    batched = answer_samples(answerer, samples, batch_size=4, max_new_tokens=MAX_NEW_TOKENS)
    alone = [
        generate_answer(answerer, sample.messages, sample.images, MAX_NEW_TOKENS).strip()
        for sample in samples
    ]
    assert batched == alone
    assert len(set(batched)) > 1  # the prompts really differ
    assert answerer.processor.tokenizer.padding_side == "right"  # restored for training


def test_scores_are_per_sample_means_and_worst_first():
    samples = [
        Prompt(f"a:{n}", [], "", reference=reference) for n, reference in enumerate(["Red.", "B", "Blue."], 1)
    ]
    result = score_samples("base", samples, ["red", "(B) blue", "green"])
    assert result.metrics["normalised_match"] == pytest.approx(0.5)  # 1 of the 2 text samples
    assert result.metrics["choice_accuracy"] == 1.0
    assert result.overall == pytest.approx(2 / 3)
    assert [answer["source"] for answer in result.worst(1)] == ["a:3"]


def _adapter_trained_on(adapter_folder, data, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_folder, folder)
    (folder / "tuner_config.yaml").write_text(
        yaml.safe_dump({"data": {"path": str(data), "image_root": None}})
    )
    return folder


def test_eval_data_overlapping_the_training_data_is_refused(adapter, eval_file, tmp_path):
    # The training set holds the first eval question on the same picture under another file name.
    training = tmp_path / "train"
    training.mkdir()
    shutil.copy(eval_file.parent / "red.png", training / "copy.png")
    record = {
        "messages": [
            {"role": "user", "content": "<image>What colour is this?"},
            {"role": "assistant", "content": "Something else."},
        ],
        "images": ["copy.png"],
    }
    (training / "train.jsonl").write_text(json.dumps(record) + "\n")
    folder = _adapter_trained_on(adapter[0], training / "train.jsonl", tmp_path)
    samples = load_eval_conversations(eval_file)
    with pytest.raises(DataError, match=r"1 of 4 samples .* are in the training data"):
        check_overlap(samples, folder, str(eval_file), allow_overlap=False)
    assert check_overlap(samples, folder, str(eval_file), allow_overlap=True) == 1
    # Another picture with the same question is not an overlap.
    Image.new("RGB", (56, 84), (0, 0, 0)).save(training / "copy.png")
    assert check_overlap(samples, folder, str(eval_file), allow_overlap=False) == 0


def test_cli_scores_base_and_adapter_side_by_side(adapter, eval_file, tmp_path, capsys):
    folder, _ = adapter
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        capsys,
        *("eval", "qwenvl", "--data", str(eval_file), "--adapter", str(folder), "--adapter", str(folder)),
        *("--model", "tiny-qwen2.5-vl", "--out", str(out), "--max-new-tokens", "4", "--device", "cpu"),
        *("--batch-size", "3"),
    )
    assert code == 0, stderr
    report = json.loads((out / "eval.json").read_text())
    assert [model["name"] for model in report["models"]] == ["base", str(folder), str(folder)]
    assert set(report["metrics"]) >= {"normalised_match", "anls", "choice_accuracy", "box_accuracy"}
    assert "overall" in stdout and "worst samples" in stdout
    first, second = report["models"][1:]
    assert first["metrics"] == second["metrics"]  # the adapter was taken off and put on again cleanly
    answers = {
        model["name"] + str(index): [json.loads(line) for line in (out / model["answers"]).open()]
        for index, model in enumerate(report["models"])
    }
    assert answers[str(folder) + "1"] == answers[str(folder) + "2"]
    assert [a["answer"] for a in answers["base0"]] != [a["answer"] for a in answers[str(folder) + "1"]]
    for answer in answers["base0"]:  # the stored scores are the metrics of the stored answers
        assert answer["scores"] == score_answer(answer["answer"], [answer["reference"]])
    box = next(a for a in answers["base0"] if "bbox_2d" in a["reference"])
    assert set(box["scores"]) == {"box_accuracy", "box_iou"}


@pytest.mark.slow
def test_training_scores_eval_data_on_schedule_and_keeps_the_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(out), "--max-steps", "6"),
        *("--lr", "1e-2", "--set", "output.eval_data=tiny", "--set", "output.eval_every=2"),
        *("--set", "output.keep_best=eval/overall", "--set", "output.checkpoint_every=0"),
        *("--set", "output.keep_checkpoints=1", "--set", "output.log_every=1"),
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval/overall" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 6]
    assert all({"eval/normalised_match", "eval/anls"} <= set(r) for r in evaluated)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # beside the loss
    answers = [json.loads(line) for line in (out / "samples" / "eval_answers.jsonl").open()]
    questions = len(load_eval_conversations("tiny"))  # every held-out question, at every evaluation
    assert [a["step"] for a in answers] == [2] * questions + [4] * questions + [6] * questions
    # The first highest score is the best; its checkpoint survives keep_checkpoints=1 beside the last.
    best = max(evaluated, key=lambda r: r["eval/overall"])  # max keeps the first of equals
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step-{best['step']:06d}", "step-000006"})
    assert f"best checkpoint (eval/overall={best['eval/overall']:.4g}, step {best['step']})" in stdout


def test_training_refuses_eval_data_that_overlaps_the_training_data(tmp_path, capsys):
    training = resolve_tiny_dataset("tiny", "qwenvl-lora")
    code, _, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path / "run")),
        *("--set", f"output.eval_data={training}"),
    )
    assert code == 2
    assert "output.eval_data" in stderr and "also in the training data" in stderr
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (("output.keep_best=eval/bogus", "output.eval_data=tiny"), "no eval metric 'bogus'"),
        (("output.keep_best=eval/anls",), "without output.eval_data"),
        (("output.eval_every=5",), "without output.eval_data"),
        (("output.keep_best=validation_loss",), "needs a validation loss"),
    ],
)
def test_evaluation_settings_that_would_do_nothing_are_refused(tmp_path, capsys, setting, message):
    sets = [arg for value in setting for arg in ("--set", value)]
    code, _, stderr = run_cli(
        capsys, "train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path / "run"), *sets
    )
    assert code == 2 and message in stderr


def _video_eval_set(folder):
    """Two held-out questions about videos: an MPEG-4 file and a folder of frames."""
    write_video(folder / "clip.mp4", frames=8, size=64, fps=4)
    write_frame_folder(folder / "frames", frames=4, size=48)
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "video", "video": "clip.mp4"},
                        {"type": "text", "text": "What moves?"},
                    ],
                },
                {"role": "assistant", "content": "A red square."},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "<video>Which way?"},
                {"from": "gpt", "value": "Right."},
            ],
            "video": "frames",
        },
    ]
    path = folder / "videos.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in records), encoding="utf-8")
    return path


def test_cli_evaluates_video_records_with_their_frames(tmp_path, capsys):
    data = _video_eval_set(tmp_path)
    out = tmp_path / "out"
    code, _, stderr = run_cli(
        capsys,
        *("eval", "qwenvl", "--data", str(data), "--model", "tiny-qwen3-vl", "--out", str(out)),
        *("--max-new-tokens", "3", "--device", "cpu"),
    )
    assert code == 0, stderr
    report = json.loads((out / "eval.json").read_text())
    answers = [json.loads(line) for line in (out / report["models"][0]["answers"]).open()]
    assert [a["reference"] for a in answers] == ["A red square.", "Right."]
    assert all(a["answer"] and "normalised_match" in a["scores"] for a in answers)


@pytest.mark.slow
def test_training_evaluates_videos_and_a_failing_evaluation_costs_nothing(tmp_path, capsys):
    data = _video_eval_set(tmp_path)
    Image.new("RGB", (56, 56), (220, 30, 30)).save(tmp_path / "red.png")
    record = {
        "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]
    }
    (tmp_path / "train.jsonl").write_text(json.dumps({**record, "images": ["red.png"]}) + "\n")
    out = tmp_path / "run"
    train = ("train", "qwenvl-lora", "--preset", "tiny-cpu", "--model", "tiny-qwen2.5-vl")
    train += ("--data", str(tmp_path / "train.jsonl"), "--output", str(out), "--set", "output.log_every=1")
    evaluation = ("--set", f"output.eval_data={data}", "--set", "output.eval_every=1")
    code, _, stderr = run_cli(capsys, *train, "--max-steps", "2", *evaluation)
    assert code == 0, stderr
    answers = [json.loads(line) for line in (out / "samples" / "eval_answers.jsonl").open()]
    assert [(a["step"], a["reference"]) for a in answers] == [
        (step, reference) for step in (1, 2) for reference in ("A red square.", "Right.")
    ]
    first_adapter = (out / "adapter_model.safetensors").read_bytes()
    # A frame that passes the start check (its header reads) but cannot be decoded: the evaluation at
    # the last step of the resumed run fails, after its checkpoint and adapter are written.
    frame = tmp_path / "frames" / "frame_003.png"
    frame.write_bytes(frame.read_bytes()[:60])
    code, _, stderr = run_cli(capsys, *train, "--max-steps", "3", *evaluation, "--resume", "latest")
    assert code == 0, stderr
    assert "warning: the evaluation at step 3 failed" in stderr and "frame_003.png" in stderr
    assert (out / "checkpoints" / "step-000003").is_dir()
    assert (out / "adapter_model.safetensors").read_bytes() != first_adapter  # the resumed run's adapter
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/overall" in r] == [1, 2]


def test_video_questions_overlap_only_on_the_same_frames(tmp_path):
    from tuner.eval.qwenvl import overlapping_samples

    eval_set = load_eval_conversations(_video_eval_set(tmp_path))
    training = tmp_path / "train"
    write_frame_folder(training / "same", frames=4, size=48)  # the eval video's frames, renamed
    write_frame_folder(training / "other", frames=4, size=40)
    records = [
        {
            "conversations": [
                {"from": "human", "value": "<video>Which way?"},
                {"from": "gpt", "value": "Up."},
            ],
            "video": name,
        }
        for name in ("other", "same")
    ]
    (training / "train.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    assert overlapping_samples(eval_set, str(training / "train.jsonl"), None) == [eval_set[1].source]
    (training / "train.jsonl").write_text(json.dumps(records[0]))
    assert overlapping_samples(eval_set, str(training / "train.jsonl"), None) == []
