"""Every config key acts in both recipes or is refused by the one that cannot honour it (issue #14).

The walk below fails when the schema gains a key nobody classified: a new key must either be read by
both recipes (listed in ACTS_IN_BOTH with where it acts) or be in one recipe's UNUSED_KEYS, and then
that recipe refuses any value but the default before it writes or loads anything.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuner.config.keys import config_value
from tuner.config.load import all_keys, build_config
from tuner.config.presets import load_preset, preset_names
from tuner.config.schema import RunConfig
from tuner.errors import ConfigError
from tuner.recipes import qwenvl, sdxl

# Key -> where it acts, in both recipes. The keys issue #14 found ignored by Qwen-VL have their own
# tests: data.background, data.max_image_pixels, train.ema_decay, output.validate_every
# (tests/recipes/test_qwenvl_recipe.py) and output.save_format (test_save_format_is_checked_per_task).
ACTS_IN_BOTH: dict[str, str] = {
    "task": "picks the recipe (tuner train <task>)",
    "model.name_or_path": "resolve_base_model",
    "model.revision": "resolve_base_model and the model loaders",
    "model.allow_pickle": "load_sdxl / load_qwenvl",
    "data.path": "the data gate (load_training_portions / load_training_conversations)",
    "data.background": "image decoding (SDXL dataset, EncodedConversations, sample answers)",
    "data.max_image_pixels": "the data gate and image decoding",
    "data.validation_fraction": "hold_out_validation / held_out_indices",
    "data.skip_bad": "admit_dataset",
    "data.max_bad_fraction": "admit_dataset",
    "data.num_workers": "TrainingJob.num_workers",
    "data.pin_memory": "TrainingJob.pin_memory (the data loader)",
    "lora.rank": "the LoRA config",
    "lora.alpha": "the LoRA config",
    "lora.dropout": "the LoRA config",
    "lora.targets": "unet_target_modules / lora_target_modules",
    "lora.init": "the LoRA config (default or gaussian: initialisations that keep the base weights)",
    "lora.variant": "the adapter config (dora both; lokr/loha SDXL, refused by add_lora for Qwen-VL)",
    "lora.use_rslora": "the LoRA config",
    "lora.lr_ratio": "lora_plus_groups (the optimizer's B-matrix groups, tests/training/test_lora_plus.py)",
    "optim.name": "build_optimizer",
    "optim.lr": "build_optimizer",
    "optim.weight_decay": "build_optimizer",
    "optim.betas": "build_optimizer",
    "optim.eps": "build_optimizer",
    "optim.scheduler": "build_lr_scheduler",
    "optim.warmup_steps": "build_lr_scheduler",
    "optim.max_grad_norm": "settings_from_config (and DeepSpeed's clipping)",
    "train.batch_size": "GroupedBatchSampler",
    "train.grad_accum": "the Accelerator and settings_from_config",
    "train.max_steps": "settings_from_config",
    "train.epochs": "settings_from_config",
    "train.seed": "set_seed, the sampler, per-sample seeds",
    "train.gradient_checkpointing": "enable_gradient_checkpointing",
    "train.ema_decay": "settings_from_config; both recipes save the EMA adapter",
    "train.max_nonfinite": "settings_from_config",
    "train.extend_schedule": "settings_from_config (the schedule of a resumed run)",
    "output.dir": "the output folder",
    "output.checkpoint_every": "settings_from_config",
    "output.keep_checkpoints": "settings_from_config",
    "output.log_every": "settings_from_config",
    "output.log_with": "start_trackers (both recipes)",
    "output.sample_every": "settings_from_config",
    "output.validate_every": "settings_from_config",
    "output.keep_best": "settings_from_config (validation_loss; eval/<metric> needs output.eval_data)",
    "output.save_format": "the save step (each recipe refuses the other's formats)",
    "output.overwrite": "prepare_output_folder",
    "runtime.device": "resolve_runtime",
    "runtime.devices": "resolve_runtime",
    "runtime.mixed_precision": "resolve_runtime",
    "runtime.num_threads": "set_cpu_threads",
    "hub.endpoint": "apply_hub_settings (tuner train)",
    "hub.ca_bundle": "apply_hub_settings (tuner train)",
    "hub.offline": "apply_hub_settings and resolve_model_path",
    "hub.source": "resolve_model_path",
    "hub.cache_dir": "apply_hub_settings (tuner train)",
    "hub.insecure_skip_tls_verify": "apply_hub_settings (tuner train)",
}
RECIPES = {"sdxl-lora": sdxl, "qwenvl-lora": qwenvl}
TRAIN = {"sdxl-lora": sdxl.train_sdxl_lora, "qwenvl-lora": qwenvl.train_qwenvl_lora}


def _field(key: str):
    model: type[BaseModel] = RunConfig
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[leaf]


def other_value(key: str) -> object:
    """A valid value for `key` that is not its default."""
    default = config_value(RunConfig(), key)
    annotation = _field(key).annotation
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in options if option != default)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.5
    if isinstance(default, str):
        return default + "_other"
    if isinstance(default, list):
        (item,) = typing.get_args(annotation)
        # A list of sections (data.sources) takes one section with its required keys.
        return [{"path": "x"}] if isinstance(item, type) and issubclass(item, BaseModel) else ["x"]
    if default is None and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kind = next(option for option in options if option is not type(None))
        return {int: 2, float: 0.5, str: "x"}[kind]
    raise AssertionError(f"no non-default value known for {key}")


def _config(tmp_path: Path, task: str, key: str, value: object) -> RunConfig:
    layer: dict = {"task": task, "data": {"path": str(tmp_path / "no-data")}, "output": {}}
    node = layer
    *sections, leaf = key.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    layer["output"].setdefault("dir", str(tmp_path / "out"))
    return RunConfig.model_validate(layer)


def test_every_schema_key_is_classified_once() -> None:
    unused = {task: set(recipe.UNUSED_KEYS) for task, recipe in RECIPES.items()}
    assert unused["sdxl-lora"].isdisjoint(unused["qwenvl-lora"])
    assert set(ACTS_IN_BOTH).isdisjoint(unused["sdxl-lora"] | unused["qwenvl-lora"])
    classified = set(ACTS_IN_BOTH) | unused["sdxl-lora"] | unused["qwenvl-lora"]
    assert set(all_keys()) - classified == set(), "a config key neither acts in both recipes nor is refused"
    assert classified - set(all_keys()) == set(), "a classified key is not in the schema"


@pytest.mark.parametrize(
    ("task", "key"),
    [(task, key) for task, recipe in RECIPES.items() for key in recipe.UNUSED_KEYS],
)
def test_a_recipe_refuses_a_key_it_does_not_use(tmp_path: Path, task: str, key: str) -> None:
    config = _config(tmp_path, task, key, other_value(key))
    with pytest.raises(ConfigError) as error:
        TRAIN[task](config)
    assert f"'{key}'" in error.value.message and task in error.value.message
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("task", "save_format", "refused"),
    [
        ("sdxl-lora", "peft", True),
        ("qwenvl-lora", "diffusers", True),
        ("qwenvl-lora", "kohya", True),
        ("qwenvl-lora", "peft", False),
        ("qwenvl-lora", RunConfig().output.save_format, False),
    ],
)
def test_save_format_is_checked_per_task(tmp_path: Path, task: str, save_format: str, refused: bool) -> None:
    config = _config(tmp_path, task, "output.save_format", save_format)
    with pytest.raises(ConfigError if refused else Exception) as error:
        TRAIN[task](config)
    if refused:
        assert "output.save_format" in error.value.message
    else:  # accepted: the run goes on to the data, which does not exist
        assert "does not exist" in str(error.value)


def test_qwenvl_refuses_ema_with_sharded_weights(tmp_path: Path) -> None:
    config = _config(tmp_path, "qwenvl-lora", "train.ema_decay", 0.9)
    config.runtime.distributed = "zero3"
    with pytest.raises(ConfigError, match=r"train\.ema_decay .*zero3"):
        qwenvl.train_qwenvl_lora(config)


@pytest.mark.parametrize("name", preset_names())
def test_presets_set_only_keys_their_tasks_use(name: str) -> None:
    preset_task = load_preset(name).get("task")
    for task in [preset_task] if preset_task else list(RECIPES):
        config = build_config(preset=name, task=task)
        for key in RECIPES[task].UNUSED_KEYS:
            assert config_value(config, key) == config_value(RunConfig(), key), (name, task, key)


def test_a_preset_section_for_one_task_applies_to_that_task_only() -> None:
    sdxl_data = build_config(preset="tiny-cpu", task="sdxl-lora").data
    qwenvl_data = build_config(preset="tiny-cpu", task="qwenvl-lora").data
    defaults = RunConfig().data
    assert sdxl_data.resolution == 64 and qwenvl_data.resolution == defaults.resolution
    assert qwenvl_data.max_pixels == 12544 and sdxl_data.max_pixels == defaults.max_pixels
    assert sdxl_data.path == qwenvl_data.path == "tiny"  # the shared part


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        (["lora.text_encoder_lr=1e-5"], "lora.text_encoder_lr=1e-05 is set, but lora.text_encoder is off"),
        (["data.prior_loss_weight=0.5"], "data.prior_loss_weight=0.5 is set, but no source holds class"),
        (["data.keep_tags=1"], "data.keep_tags=1 is set, but data.shuffle_tags is off"),
        (
            ["lora.variant=dora", "output.save_format=kohya"],
            "output.save_format=kohya with lora.variant=dora would keep only the kohya file",
        ),
    ],
)
def test_sdxl_refuses_keys_that_cannot_act_before_writing(tmp_path: Path, capsys, settings, refused) -> None:
    from tests.cli_runner import run_cli

    output = tmp_path / "run"
    overrides = [part for setting in settings for part in ("--set", setting)]
    command = ["train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(output), *overrides]
    code, _, err = run_cli(capsys, *command)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {refused}"), err
    assert not output.exists()


@pytest.mark.parametrize(
    "settings",
    [
        ["lora.text_encoder_lr=1e-5", "lora.text_encoder=true"],
        ["data.keep_tags=1", "data.shuffle_tags=true"],
        ["lora.variant=dora", "output.save_format=both"],
        ["data.prior_loss_weight=0.5", "data.sources=[{path: class, reg: true}]"],
    ],
)
def test_the_same_keys_are_taken_where_they_act(tmp_path: Path, settings: list[str]) -> None:
    where = [f"output.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'no-data'}"]
    config = build_config(preset="tiny-cpu", overrides=[*settings, *where], task="sdxl-lora")
    with pytest.raises(Exception) as error:  # accepted: the run goes on to the data, which does not exist
        sdxl.train_sdxl_lora(config)
    assert "does not exist" in str(error.value)
