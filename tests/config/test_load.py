from pathlib import Path

import pytest
import yaml

from tuner.config.load import build_config, parse_override, write_resolved_config
from tuner.config.presets import load_preset, preset_names
from tuner.config.schema import RunConfig
from tuner.errors import ConfigError


def test_defaults_are_the_bottom_layer():
    assert build_config() == RunConfig()


def test_layers_later_wins(tmp_path: Path):
    user_file = tmp_path / "run.yaml"
    user_file.write_text("optim:\n  lr: 0.5\ntrain:\n  batch_size: 3\n  max_steps: 7\n")
    config = build_config(
        preset="tiny-cpu",
        config_file=user_file,
        flags={"train.batch_size": 5, "train.seed": None},
        overrides=["train.batch_size=6", "lora.targets=[llm, vision]"],
    )
    assert config.runtime.device == "cpu"  # from the preset
    assert config.optim.lr == 0.5  # the file beats the preset's 1e-3
    assert config.train.max_steps == 7
    assert config.train.batch_size == 6  # --set beats the flag, which beat the file
    assert (
        config.train.seed == load_preset("tiny-cpu")["train"]["seed"]
    )  # a flag left at None overrides nothing
    assert config.lora.targets == ["llm", "vision"]


def test_unknown_key_suggests_closest(tmp_path: Path):
    with pytest.raises(ConfigError) as error:
        build_config(overrides=["optim.learning_rat=1"])
    assert "optim.learning_rat" in error.value.message
    with pytest.raises(ConfigError) as error:
        build_config(overrides=["train.batchsize=2"])
    assert "train.batch_size" in error.value.hint
    # The right name in the wrong section is found too.
    with pytest.raises(ConfigError) as error:
        build_config(overrides=["train.lr=2"])
    assert "optim.lr" in error.value.hint


def test_unknown_section_and_file_key_name_the_file(tmp_path: Path):
    user_file = tmp_path / "bad.yaml"
    user_file.write_text("modle:\n  name_or_path: x\n")
    with pytest.raises(ConfigError) as error:
        build_config(config_file=user_file)
    assert str(user_file) in error.value.message and "'modle'" in error.value.message
    assert "model" in error.value.hint


def test_type_error_names_key_value_and_type():
    with pytest.raises(ConfigError) as error:
        build_config(overrides=["train.batch_size=many"])
    message = error.value.message
    assert "train.batch_size" in message and "'many'" in message and "integer" in message
    with pytest.raises(ConfigError) as error:
        build_config(flags={"runtime.mixed_precision": "fp8"})
    assert "runtime.mixed_precision" in error.value.message and "bf16" in error.value.message


def test_bad_yaml_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(config_file=tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(config_file=broken)


def test_override_syntax():
    assert parse_override("optim.lr=5e-5") == ("optim.lr", 5e-5)
    assert parse_override("output.sample_prompts=[a, b]") == ("output.sample_prompts", ["a", "b"])
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        parse_override("optim.lr")


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError) as error:
        build_config(preset="tiny-cpuu")
    assert "tiny-cpu" in error.value.hint


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates_and_sets_no_insecure_flag(name: str):
    config = build_config(preset=name)
    assert config.hub.insecure_skip_tls_verify is False


def test_required_presets_exist():
    for name in ("tiny-cpu", "sdxl-910b", "sdxl-cuda-24gb", "qwen2.5-vl-7b-910b", "qwen2.5-vl-3b-cuda-24gb"):
        assert name in preset_names()


def test_task_mismatch_is_refused():
    with pytest.raises(ConfigError, match="sdxl-lora"):
        build_config(preset="sdxl-910b", task="qwenvl-lora")


def test_resolved_config_round_trips(tmp_path: Path):
    config = build_config(
        preset="sdxl-cuda-24gb", overrides=["optim.lr=3e-5", "data.background=[0, 0, 0]"], task="sdxl-lora"
    )
    path = write_resolved_config(config, tmp_path / "run")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == 3e-5
    assert build_config(config_file=path, task="sdxl-lora") == config


def test_lora_init_choices_are_one_mapping_that_both_families_build_from() -> None:
    from typing import get_args

    from tuner.config.schema import LORA_INIT_WEIGHTS, LoraConfig
    from tuner.models.sdxl_lora import lora_config

    assert set(get_args(LoraConfig.model_fields["init"].annotation)) == set(LORA_INIT_WEIGHTS)
    for init, peft_value in LORA_INIT_WEIGHTS.items():
        assert lora_config(["to_q"], rank=2, alpha=2.0, init=init).init_lora_weights == peft_value
