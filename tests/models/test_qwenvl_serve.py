"""The vLLM command lines written for a Qwen-VL adapter (serve.md, `tuner serve-command`), and a run's
outputs as users take them: every line of serve.md run as pasted against a stand-in for vLLM 0.32
(tests/models/vllm_standin, which checks what the real entry points check), files readable by the group
under a group-readable umask, and the end of the run saying which file each client takes."""

import contextlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from PIL import Image
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


def _adapter(
    folder: Path, *, rank: int, targets: list[str], rank_pattern: dict | None = None, dtype: str | None = None
) -> Path:
    folder.mkdir(parents=True)
    # PEFT saves target_modules as leaf names; which parts were adapted shows in the weight names.
    peft_config = {"r": rank, "target_modules": ["q_proj"], "rank_pattern": rank_pattern or {}}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config))
    weights = {f"base_model.model.{module}.lora_A.weight": torch.zeros(rank, 4) for module in targets}
    save_file(weights, str(folder / "adapter_model.safetensors"))
    record = {"base_model": BASE, "family": "qwen2_5_vl", **({"dtype": dtype} if dtype else {})}
    (folder / "tuner_adapter.json").write_text(json.dumps(record))
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


def test_the_training_dtype_reaches_every_line_and_the_merge(tmp_path):
    adapter = _adapter(
        tmp_path / "fp32",
        rank=8,
        targets=["model.language_model.layers.0.self_attn.q_proj"],
        dtype="torch.float32",
    )
    facts = read_serve_facts(adapter)
    assert facts.dtype == "float32"
    markdown = serve_markdown(facts)
    lines = [line for index in range(4) for line in _code_block(markdown, "bash", index).splitlines()]
    assert len(lines) == 5  # two servers, merge, two merged servers
    for line in lines:
        argv = shlex.split(line)
        assert argv[argv.index("--dtype") + 1] == "float32", line
    assert "dtype='float32'" in _code_block(markdown, "python")
    assert "--mixed-precision no" in markdown  # the `tuner infer` whose answers vLLM then matches
    # Before tuner recorded it: no --dtype, and serve.md says what that costs.
    unrecorded = _adapter(
        tmp_path / "old", rank=8, targets=["model.language_model.layers.0.self_attn.q_proj"]
    )
    old = serve_markdown(read_serve_facts(unrecorded))
    assert "--dtype" not in old.replace("--dtype auto", "") and "records no training dtype" in old


STANDIN = Path(__file__).parent / "vllm_standin"


def _shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with `python` (this interpreter, as a wrapper: a symlink would lose the venv) and the stand-in's
    `vllm`; PYTHONPATH with the stand-in's `vllm` package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (bin_dir / name).chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(STANDIN / "bin"), os.environ["PATH"]])
    return {**os.environ, "PATH": path, "PYTHONPATH": str(STANDIN)}


def _run(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny Qwen2.5-VL run through the CLI, under a umask that lets the group read (027): (folder, what
    it printed)."""
    output = tmp_path_factory.mktemp("served") / "run"
    printed = io.StringIO()
    previous = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(printed):
            code = _train(output)
    finally:
        os.umask(previous)
    assert code == 0, printed.getvalue()
    return output, printed.getvalue()


def _train(output: Path) -> int:
    from tuner.cli.main import main

    try:
        main(["train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(output), "--max-steps", "2",
              "--set", "output.checkpoint_every=1", "--targets", "llm,vision"])  # fmt: skip
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def test_the_run_ends_saying_which_file_each_client_takes(trained_run):
    run, out = trained_run
    end = out[out.index("Done. Everything is in") :]
    assert f"transformers + PEFT (PeftModel.from_pretrained), tuner infer/merge: {run}/" in end
    assert f"vLLM: the command lines in {run / 'serve.md'}" in end


def test_every_output_of_the_run_gets_the_umask_modes(trained_run):
    run, _ = trained_run
    paths = [run, *run.rglob("*")]
    assert any(path.name == "adapter_model.safetensors" for path in paths)
    assert any("checkpoints" in path.parts and path.suffix == ".safetensors" for path in paths)
    wrong = {
        str(path.relative_to(run)): oct(stat.S_IMODE(path.stat().st_mode))
        for path in paths
        if stat.S_IMODE(path.stat().st_mode) != (0o750 if path.is_dir() else 0o640)
    }
    assert wrong == {}


def test_every_line_of_serve_md_runs_as_pasted(trained_run, tmp_path, capsys):
    run, _ = trained_run
    markdown = (run / "serve.md").read_text()
    env = _shell_env(tmp_path)
    image = tmp_path / "pictures" / "red square.png"
    image.parent.mkdir()
    Image.new("RGB", (56, 56), (220, 30, 30)).save(image)
    settings = []
    for index in range(4):
        for line in _code_block(markdown, "bash", index).splitlines():
            if line.startswith("tuner "):  # the merge: through the CLI, as its console script runs it
                code, _, err = run_cli(capsys, *shlex.split(line)[1:])
                assert code == 0, err
                continue
            done = _run(line, env, tmp_path)
            assert done.returncode == 0, (line, done.stderr)
            settings.append(json.loads(done.stdout.splitlines()[-1]))
    assert len(settings) == 4  # vllm serve, its module form, and both for the merged model
    served, module, merged, merged_module = settings
    assert served == module
    assert served["dtype"] == merged["dtype"] == merged_module["dtype"] == "float32"
    assert served["lora_modules"] == [{"name": "run", "path": str(run)}]
    assert served["enable_tower_connector_lora"] and served["max_lora_rank"] == 8
    assert served["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert merged["model"] == merged_module["model"] == f"{run}-merged" and not merged["enable_lora"]
    assert json.loads((run.parent / "run-merged" / "tuner_merge.json").read_text())["dtype"] == "float32"
    # The CPU memory note's flag, added to a server line as it says.
    bounded = _run(_code_block(markdown, "bash", 1).strip() + " --kv-cache-memory-bytes 4G", env, tmp_path)
    assert json.loads(bounded.stdout.splitlines()[-1])["kv_cache_memory_bytes"] == 4 * 1024**3

    (tmp_path / "ask.py").write_text(_code_block(markdown, "python"))
    asked = _run(f"python ask.py {shlex.quote(str(image))} 'What colour is it?'", env, tmp_path)
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout.splitlines()[-1])
    assert answer["images"] == [str(image)] and answer["lora_path"] == str(run)
    assert answer["dtype"] == "float32" and answer["temperature"] == 0
    assert answer["enable_tower_connector_lora"] and answer["max_lora_rank"] == 8


def test_the_stand_in_refuses_what_vllm_refuses(trained_run, tmp_path):
    """The failures the issue met with the real vLLM, met again: the stand-in is no yes-man."""
    run, _ = trained_run
    markdown = (run / "serve.md").read_text()
    env = _shell_env(tmp_path)
    image = tmp_path / "red.png"
    Image.new("RGB", (56, 56), (220, 30, 30)).save(image)
    code = _code_block(markdown, "python")
    unguarded = code.replace('if __name__ == "__main__":\n    main()\n', "main()\n")
    (tmp_path / "unguarded.py").write_text(unguarded)
    done = _run(f"python unguarded.py {image}", env, tmp_path)
    assert done.returncode != 0 and "bootstrapping phase" in done.stderr
    no_media_path = re.sub(r".*allowed_local_media_path=.*\n", "", code)
    (tmp_path / "no_media_path.py").write_text(no_media_path)
    done = _run(f"python no_media_path.py {image}", env, tmp_path)
    assert (
        done.returncode != 0 and "Cannot load local files without `--allowed-local-media-path`" in done.stderr
    )
    server = _code_block(markdown, "bash", 0).strip()
    done = _run(server.replace("--max-lora-rank 8", "--max-lora-rank 12"), env, tmp_path)
    assert done.returncode != 0 and "invalid choice: 12" in done.stderr
