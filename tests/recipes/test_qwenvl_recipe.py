"""The Qwen-VL LoRA recipe end to end on the tiny model and the generated conversation dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tuner.config.schema import RunConfig
from tuner.data.conversations import ConversationRecords, load_conversations
from tuner.errors import DataError
from tuner.models.qwenvl import load_adapter_checked, load_qwenvl
from tuner.recipes.qwenvl import drop_overlong, length_groups, train_qwenvl_lora


def text_conversations(folder: Path, count: int) -> ConversationRecords:
    records = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(count)
    ]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return load_conversations(data).conversations


def test_length_groups_put_neighbouring_lengths_together():
    lengths = [500, 20, 480, 30, 25, 510, 490, 35]
    groups = length_groups(lengths * 4, batch_size=2)  # 32 samples, 16 short and 16 long
    short = {g for g, length in zip(groups, lengths * 4, strict=True) if length < 100}
    long = {g for g, length in zip(groups, lengths * 4, strict=True) if length >= 100}
    assert short.isdisjoint(long)


def test_drop_overlong_counts_and_refuses_when_nothing_fits(tmp_path: Path, capsys):
    conversations = text_conversations(tmp_path, 3)
    kept, lengths = drop_overlong(conversations, [10, 90, 30], max_length=50, overlength="drop")
    data = tmp_path / "train.jsonl"
    assert [c.source for c in kept] == [f"{data}:1", f"{data}:3"] and lengths == [10, 30]
    assert "dropped 1 of 3" in capsys.readouterr().out
    with pytest.raises(DataError, match="all 3 conversations are longer"):
        drop_overlong(conversations, [60, 90, 70], max_length=50, overlength="drop")


@pytest.mark.slow
def test_recipe_trains_saves_and_samples(tiny_model, tmp_path: Path):
    output = tmp_path / "run"
    config = RunConfig.model_validate(
        {
            "task": "qwenvl-lora",
            "model": {"name_or_path": "tiny-qwen2.5-vl"},
            "data": {
                "path": "tiny",
                "max_pixels": 64 * 64,
                "min_pixels": 56 * 56,
                "validation_fraction": 0.2,
            },
            "lora": {"rank": 4, "alpha": 8, "targets": ["llm", "vision"]},
            "optim": {"lr": 1e-3},
            "train": {"batch_size": 2, "max_steps": 3, "gradient_checkpointing": True},
            "output": {"dir": str(output), "log_every": 1},
            "runtime": {"device": "cpu", "mixed_precision": "no"},
        }
    )
    assert train_qwenvl_lora(config) == output

    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "tuner_config.yaml",
        "serve.md",
    ):
        assert (output / name).is_file(), name
    assert (output / "metrics.jsonl").read_text().strip()
    with safe_open(output / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any(".visual.blocks." in k for k in keys) and any(".language_model." in k for k in keys)

    # vision targets were trained, so vLLM must be told to apply them; the training pixel bounds too.
    serve = (output / "serve.md").read_text()
    assert "--enable-tower-connector-lora" in serve and "--max-lora-rank 8" in serve
    assert '{"min_pixels": 3136, "max_pixels": 4096}' in serve
    answers = [json.loads(line) for line in (output / "samples" / "answers.jsonl").read_text().splitlines()]
    assert answers and all({"question", "reference", "answer"} <= set(a) for a in answers)

    base = load_qwenvl(str(tiny_model("qwen2.5-vl")), dtype=torch.float32)[0]
    load_adapter_checked(base, output)  # raises if any weight in the file fits no layer


def test_a_packed_run_trains_the_same_adapter_as_a_padded_run(tmp_path: Path):
    """Packing changes the layout of a batch, not what is learned: same losses, same adapter."""

    def train(packing: bool) -> Path:
        output = tmp_path / f"packing-{packing}"
        config = RunConfig.model_validate(
            {
                "task": "qwenvl-lora",
                "model": {"name_or_path": "tiny-qwen2.5-vl"},
                "data": {"path": "tiny", "max_pixels": 64 * 64, "min_pixels": 56 * 56, "packing": packing},
                "lora": {"rank": 4, "alpha": 8, "targets": ["llm", "vision"]},
                "optim": {"lr": 1e-3},
                "train": {"batch_size": 3, "max_steps": 3},
                "output": {"dir": str(output), "log_every": 1},
                "runtime": {"device": "cpu", "mixed_precision": "no"},
            }
        )
        return train_qwenvl_lora(config)

    padded, packed = train(False), train(True)

    def losses(output: Path) -> list[float]:
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [record["loss"] for record in records if "loss" in record]

    assert len(losses(packed)) == 3
    assert losses(packed) == pytest.approx(losses(padded), rel=1e-4)
    with (
        safe_open(padded / "adapter_model.safetensors", "pt") as a,
        safe_open(packed / "adapter_model.safetensors", "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in sorted(a.keys()):
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), atol=1e-5, rtol=1e-4)


def _image_records(folder: Path, records: list[dict]) -> Path:
    from PIL import Image

    Image.new("RGBA", (64, 64), (200, 30, 30, 0)).save(folder / "red.png")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return data


def _gate_config(data: Path, output: Path, **data_settings) -> RunConfig:
    return RunConfig.model_validate(
        {"task": "qwenvl-lora", "data": {"path": str(data), **data_settings}, "output": {"dir": str(output)}}
    )


def _record(question: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"<image>{question}"},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["red.png"],
    }


def test_the_data_gate_applies_max_image_pixels(tmp_path: Path) -> None:
    from tuner.recipes.qwenvl import load_training_conversations

    data = _image_records(tmp_path, [_record("What colour?")])
    assert len(load_training_conversations(_gate_config(data, tmp_path / "a"))) == 1
    with pytest.raises(DataError) as refused:
        load_training_conversations(_gate_config(data, tmp_path / "b", max_image_pixels=1000))
    assert "red.png" in refused.value.message and "over the limit of 1,000 pixels" in refused.value.message


def test_duplicate_conversations_train_with_a_warning(tmp_path: Path, capsys) -> None:
    from tuner.recipes.qwenvl import load_training_conversations

    data = _image_records(tmp_path, [_record("What colour?"), _record("Name it."), _record("What colour?")])
    assert len(load_training_conversations(_gate_config(data, tmp_path / "out"))) == 3
    printed = capsys.readouterr().out
    assert f"warning: {data}:3: same conversation and images as {data}:1" in printed


@pytest.mark.slow
def test_background_pixel_limit_ema_and_validate_every_act(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """Keys that Qwen-VL used to ignore: data.background and data.max_image_pixels reach every image
    decode, train.ema_decay writes an EMA adapter, output.validate_every validates mid-run."""
    from tuner.recipes import qwenvl as recipe

    decoded: list[tuple] = []
    encode = recipe.encode_conversation

    def recording_encode(*args, **kwargs):
        decoded.append((kwargs.get("background"), kwargs.get("max_image_pixels")))
        return encode(*args, **kwargs)

    monkeypatch.setattr(recipe, "encode_conversation", recording_encode)
    output = tmp_path / "run"
    config = RunConfig.model_validate(
        {
            "task": "qwenvl-lora",
            "model": {"name_or_path": "tiny-qwen2.5-vl"},
            "data": {
                "path": "tiny",
                "max_pixels": 64 * 64,
                "min_pixels": 56 * 56,
                "validation_fraction": 0.3,
                "background": [0, 0, 0],
                "max_image_pixels": 1_000_000,
            },
            "lora": {"rank": 4, "alpha": 8},
            "optim": {"lr": 1e-2},
            "train": {"batch_size": 2, "max_steps": 2, "ema_decay": 0.5},
            "output": {"dir": str(output), "log_every": 1, "validate_every": 1},
            "runtime": {"device": "cpu", "mixed_precision": "no"},
        }
    )
    train_qwenvl_lora(config)

    assert decoded and set(decoded) == {((0, 0, 0), 1_000_000)}
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "validation_loss" in record] == [1, 2]
    ema = output / "ema"
    assert json.loads((ema / "tuner_adapter.json").read_text())["ema_decay"] == 0.5
    with (
        safe_open(output / "adapter_model.safetensors", "pt") as trained,
        safe_open(ema / "adapter_model.safetensors", "pt") as averaged,
    ):
        assert set(trained.keys()) == set(averaged.keys())
        assert any(not torch.equal(trained.get_tensor(k), averaged.get_tensor(k)) for k in trained.keys())  # noqa: SIM118
    base = load_qwenvl(str(tiny_model("qwen2.5-vl")), dtype=torch.float32)[0]
    load_adapter_checked(base, ema)  # a complete adapter folder: every weight fits a layer
