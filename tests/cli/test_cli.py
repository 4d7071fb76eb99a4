import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cli

TUNER = Path(sys.executable).with_name("tuner")


def test_help_lists_the_command_tree(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in ("env", "presets", "train"):
        assert command in out


def test_presets_show_prints_the_resolved_preset(capsys):
    code, out, _ = run_cli(capsys, "presets", "show", "tiny-cpu")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["runtime"]["device"] == "cpu"
    assert resolved["optim"]["weight_decay"] == 0.01  # a built-in default, resolved under the preset


def test_unknown_preset_is_two_lines_and_exit_2(capsys):
    code, _, err = run_cli(capsys, "presets", "show", "tiny-gpu")
    assert code == 2
    assert err.splitlines() == [
        "error: unknown preset 'tiny-gpu'",
        err.splitlines()[1],
    ]
    assert err.splitlines()[1].startswith("hint: did you mean 'tiny-cpu'?")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["train", "sdxl-lora", "--preset", "tiny-cpu", "--output", "o", "--set", "train.batchsize=2"],
            "unknown config key 'train.batchsize'",
        ),
        (
            ["train", "sdxl-lora", "--preset", "tiny-cpu", "--output", "o", "--batch-size", "two"],
            "Invalid value for '--batch-size'",
        ),
        (
            ["train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", "o", "--mixed-precision", "fp8"],
            "runtime.mixed_precision",
        ),
        (
            ["train", "sdxl-lora", "--preset", "tiny-cpu", "--output", "o", "--config", "missing.yaml"],
            "config file missing.yaml does not exist",
        ),
        (["train", "sdxl-lora", "--preset", "tiny-cpu"], "no output folder given"),
        (["train", "sdxl-lora", "--preset", "qwen2.5-vl-7b-910b", "--output", "o"], "the config is for task"),
        (["presets", "show", "tiny-cpu", "--bogus"], "No such option: --bogus"),
    ],
)
def test_user_errors_are_short_and_exit_2(capsys, argv, expected):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines)


def test_verbose_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "--verbose", "presets", "show", "nope")
    assert code == 2
    assert "Traceback" in err and "error: unknown preset 'nope'" in err


def test_console_script_runs_in_a_real_subprocess():
    result = subprocess.run([str(TUNER), "presets", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tiny-cpu" in result.stdout and "sdxl-910b" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "tuner", "presets", "show", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown preset 'nope'")


def test_packing_and_attention_flags_reach_the_run(capsys, tmp_path):
    output = tmp_path / "run"
    argv = ("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(output), "--packing")
    code, out, err = run_cli(capsys, *argv, "--attention", "eager", "--max-steps", "1")
    assert code == 0, err
    resolved = yaml.safe_load((output / "tuner_config.yaml").read_text())
    assert resolved["data"]["packing"] is True and resolved["model"]["attention"] == "eager"
    assert "data.packing with attention=eager" in out
    assert (output / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--from-env", "train", "sdxl-lora"], "No such option: --from-env"),
        (["tarin", "sdxl-lora"], "'tarin' is not a tuner command"),
        ([], "needs the tuner command"),
    ],
)
def test_launch_refuses_what_it_would_pass_through_unread(capsys, argv, expected):
    code, out, err = run_cli(capsys, "launch", "--dry-run", *argv)
    assert code == 2
    assert expected in err and "accelerate launch" not in out


def test_launch_passes_the_tuner_command_and_its_options(capsys):
    code, out, _ = run_cli(capsys, "launch", "--dry-run", "--device", "cpu", "--", "-v", "train", "sdxl-lora",
                           "--preset", "tiny-cpu")  # fmt: skip
    assert code == 0
    assert out.splitlines()[-1].endswith("-m tuner -v train sdxl-lora --preset tiny-cpu")
