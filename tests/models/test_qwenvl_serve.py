"""The vLLM command lines written for a Qwen-VL adapter (serve.md, `tuner serve-command`)."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import save_file

from tuner.errors import ModelError
from tuner.models.qwenvl_serve import (
    read_serve_facts,
    serve_markdown,
    vllm_lora_rank,
    vllm_serve_command,
    write_serve_file,
)

BASE = "Qwen/Qwen2.5-VL-7B-Instruct"


def _adapter(folder: Path, *, rank: int, targets: list[str], rank_pattern: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    # PEFT saves target_modules as leaf names; which parts were adapted shows in the weight names.
    peft_config = {"r": rank, "target_modules": ["q_proj"], "rank_pattern": rank_pattern or {}}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    weights = {f"base_model.model.{module}.lora_A.weight": torch.zeros(rank, 4) for module in targets}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    (folder / "tuner_adapter.json").write_text(json.dumps({"base_model": BASE, "family": "qwen2_5_vl"}))
    # As transformers 5.23 saves a processor whose pixel bounds tuner set (`size`, no min/max_pixels).
    image = {"size": {"shortest_edge": 3136, "longest_edge": 12544}, "min_pixels": None, "max_pixels": None}
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": image}))
    return folder


def _code_block(markdown: str, language: str, index: int = 0) -> str:
    return markdown.split(f"```{language}\n")[index + 1].split("```")[0]


@pytest.mark.parametrize(
    ("rank", "accepted"), [(1, 1), (4, 8), (8, 8), (12, 16), (64, 64), (300, 320), (321, 512), (512, 512)]
)
def test_max_lora_rank_rounds_up_to_a_value_vllm_accepts(rank, accepted):
    assert vllm_lora_rank(rank) == accepted


def test_a_rank_vllm_cannot_serve_is_refused_with_the_merge_hint():
    with pytest.raises(ModelError, match="above 512") as refused:
        vllm_lora_rank(513)
    assert "tuner merge" in refused.value.hint


def test_vision_adapter_command_enables_tower_lora_and_training_pixel_bounds(tmp_path):
    targets = ["model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.0.attn.qkv"]
    adapter = _adapter(tmp_path / "receipts", rank=12, targets=targets, rank_pattern={"x": 24})
    command = vllm_serve_command(read_serve_facts(adapter))
    assert command == [
        "vllm", "serve", BASE,
        "--enable-lora",
        "--lora-modules", f"receipts={adapter.resolve()}",
        "--max-lora-rank", "32",  # the largest rank (24, from rank_pattern), rounded up
        "--enable-tower-connector-lora",
        "--mm-processor-kwargs", '{"min_pixels": 3136, "max_pixels": 12544}',
    ]  # fmt: skip
    markdown = write_serve_file(adapter).read_text()
    # The shell lines, pasted as they are, give the same argv (quoting of the JSON included).
    server, api_server = _code_block(markdown, "bash", 0), _code_block(markdown, "bash", 1)
    assert shlex.split(server) == command
    assert shlex.split(api_server) == [
        "python", "-m", "vllm.entrypoints.openai.api_server", "--model", BASE, *command[3:]
    ]  # fmt: skip
    code = _code_block(markdown, "python")
    compile(code, "serve.md", "exec")
    assert f"model='{BASE}'" in code and "max_lora_rank=32" in code
    assert "enable_tower_connector_lora=True" in code
    assert "mm_processor_kwargs={'min_pixels': 3136, 'max_pixels': 12544}" in code
    assert f"LoRARequest('receipts', 1, '{adapter.resolve()}')" in code
    merged = _code_block(markdown, "bash", 2).splitlines()
    merge = ["tuner", "merge", "--base", BASE, "--adapter", str(adapter.resolve())]
    assert shlex.split(merged[0])[:6] == merge
    assert shlex.split(merged[1]) == ["vllm", "serve", f"{adapter.resolve()}-merged"]


def test_language_model_only_adapter_leaves_the_tower_flag_out(tmp_path):
    targets = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.mlp.up_proj"]
    adapter = _adapter(tmp_path / "text only", rank=16, targets=targets)
    facts = read_serve_facts(adapter)
    command = vllm_serve_command(facts)
    assert "--enable-tower-connector-lora" not in command
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert command[command.index("--lora-modules") + 1] == f"text-only={adapter.resolve()}"
    assert "enable_tower_connector_lora" not in serve_markdown(facts)


def test_dora_adapter_gets_only_the_merged_commands(tmp_path):
    adapter = _adapter(tmp_path / "dora", rank=8, targets=["model.language_model.layers.0.self_attn.q_proj"])
    config_file = adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    markdown = serve_markdown(read_serve_facts(adapter))
    assert "DoRA" in markdown and "tuner merge" in markdown
    assert "--enable-lora" not in markdown and "--lora-modules" not in markdown


def test_serve_command_prints_the_lines_and_refuses_a_folder_without_an_adapter(tmp_path, capsys):
    adapter = _adapter(tmp_path / "run", rank=8, targets=["model.language_model.layers.0.self_attn.q_proj"])
    code, out, _ = run_cli(capsys, "serve-command", str(adapter))
    assert code == 0 and shlex.join(vllm_serve_command(read_serve_facts(adapter))) in out
    code, _, err = run_cli(capsys, "serve-command", str(tmp_path))
    assert code == 2 and "adapter_config.json" in err
