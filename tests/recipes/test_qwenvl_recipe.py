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
    ):
        assert (output / name).is_file(), name
    assert (output / "metrics.jsonl").read_text().strip()
    with safe_open(output / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any(".visual.blocks." in k for k in keys) and any(".language_model." in k for k in keys)

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
