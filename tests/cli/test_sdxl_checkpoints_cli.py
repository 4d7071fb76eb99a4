"""`tuner train sdxl-lora` on checkpoints as users have them (issue #27): a v-prediction single file with
its marker keys, zero terminal SNR, the Huber losses and LoRA+, from the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli_runner import run_cli
from safetensors.torch import load_file
from sdxl_checkpoints import marked_checkpoint

from tuner.models.sdxl_infer import Adapter, trained_prediction_type, trained_zero_terminal_snr
from tuner.models.sdxl_lora import read_adapter_metadata


def train(capsys, output: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(
        capsys,
        *("train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(output)),
        *("--set", "output.sample_steps=1", "--set", "output.checkpoint_every=0"),
        *extra,
    )


@pytest.mark.slow
def test_a_v_pred_ztsnr_checkpoint_trains_and_records_its_schedule(
    capsys, tiny_model, tmp_path: Path
) -> None:
    tiny = tiny_model("sdxl")
    checkpoint = marked_checkpoint(tiny, tmp_path / "noob-vpred.safetensors", ("v_pred", "ztsnr"))
    code, out, err = train(
        capsys,
        tmp_path / "run",
        *("--model", str(checkpoint), "--set", f"model.single_file_config={tiny}", "--max-steps", "2"),
    )
    assert code == 0, err
    # prediction_type: auto used to train this checkpoint as epsilon (sd-scripts #1772, OneTrainer #430).
    assert (
        "prediction type: v_prediction (from the checkpoint's v_pred key); noise schedule: zero terminal "
        "SNR (rescaled betas) (from the checkpoint's ztsnr key)" in out
    )
    header = read_adapter_metadata(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert header["tuner.prediction_type"] == "v_prediction"
    assert header["tuner.zero_terminal_snr"] == "True"
    kohya = read_adapter_metadata(tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["ss_v_parameterization"] == "True" and kohya["ss_zero_terminal_snr"] == "True"
    # tuner infer / eval read them back for their sampler, from either file.
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
        adapters = [Adapter(tmp_path / "run" / name)]
        assert trained_prediction_type(adapters) == "v_prediction"
        assert trained_zero_terminal_snr(adapters) is True


def test_zero_terminal_snr_with_epsilon_is_refused_with_the_keys_named(capsys, tmp_path: Path) -> None:
    code, _, err = train(
        capsys,
        tmp_path / "run",
        *("--set", "train.zero_terminal_snr=true", "--set", "train.prediction_type=epsilon"),
    )
    assert code == 2
    assert "train.zero_terminal_snr" in err and "train.prediction_type" in err and "Traceback" not in err


@pytest.mark.slow
def test_zero_terminal_snr_flag_and_huber_loss_reach_the_adapter_and_kohya_file(
    capsys, tmp_path: Path
) -> None:
    code, out, err = train(
        capsys,
        tmp_path / "run",
        *("--max-steps", "2", "--set", "train.prediction_type=v_prediction"),
        *("--set", "train.zero_terminal_snr=true", "--set", "train.loss=huber"),
        *("--set", "train.huber_schedule=exponential", "--set", "train.huber_c=0.2"),
    )
    assert code == 0, err
    assert "noise schedule: zero terminal SNR (rescaled betas) (from train.zero_terminal_snr)" in out
    kohya = read_adapter_metadata(tmp_path / "run" / "pytorch_lora_weights_kohya.safetensors")
    assert kohya["ss_zero_terminal_snr"] == "True"
    assert (kohya["ss_loss_type"], kohya["ss_huber_c"], kohya["ss_huber_schedule"]) == (
        "huber",
        "0.2",
        "exponential",
    )
    assert kohya["ss_max_token_length"] == "None"


@pytest.mark.slow
def test_lora_plus_moves_the_b_matrices_ratio_times_further(capsys, tmp_path: Path) -> None:
    # After one Adam step from B = 0, every B element moved by about lr (Adam normalises the gradient)
    # and A not at all (its gradient is zero while B is): with lr_ratio 16, B moved 16 times as far.
    adapters = {}
    for ratio in (None, 16):
        extra = ("--set", f"lora.lr_ratio={ratio}") if ratio else ()
        code, _, err = train(capsys, tmp_path / f"run-{ratio}", "--max-steps", "1", *extra)
        assert code == 0, err
        adapters[ratio] = load_file(tmp_path / f"run-{ratio}" / "pytorch_lora_weights.safetensors")
    plain, plus = adapters[None], adapters[16]
    b_keys = [key for key in plain if "lora_B" in key or ".up." in key]
    a_keys = [key for key in plain if key not in b_keys]
    assert b_keys and a_keys
    for key in b_keys:
        ratio = (plus[key].abs().sum() / plain[key].abs().sum()).item()
        assert ratio == pytest.approx(16, rel=0.02), key
    for key in a_keys:
        assert (plus[key] - plain[key]).abs().max() < 1e-6, key
    header = read_adapter_metadata(tmp_path / "run-16" / "pytorch_lora_weights.safetensors")
    assert header["tuner.lr_ratio"] == "16.0"


@pytest.mark.slow
def test_lora_plus_splits_the_qwenvl_groups(capsys, tmp_path: Path) -> None:
    code, out, err = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(tmp_path / "vl")),
        *("--max-steps", "1", "--set", "lora.lr_ratio=4", "--set", "output.checkpoint_every=0"),
    )
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("trainable parameters:"))
    rates = dict(re.findall(r"(llm(?: B)?) [\d,]+ \(lr ([\d.e-]+)\)", line))
    assert float(rates["llm B"]) == pytest.approx(4 * float(rates["llm"]))
