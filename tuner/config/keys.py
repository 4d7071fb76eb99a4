"""Which config keys a task reads: a key one recipe cannot honour is refused there, never ignored.

The schema is shared by every task, so it holds keys that only one model family can act on (SDXL's
`data.resolution`, Qwen-VL's `data.max_pixels`). Each recipe lists the keys it does not read; a run
that sets one of them to anything but the built-in default stops before any work with the key named,
instead of training something other than what the config says.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from tuner.config.schema import RunConfig
from tuner.errors import ConfigError
from tuner.eval.metrics import METRICS


def config_value(config: RunConfig, key: str) -> Any:
    """The value of a dotted key (`data.resolution`)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def refuse_unused_keys(config: RunConfig, task: str, unused: Iterable[str]) -> None:
    """Raise ConfigError naming the first key of `unused` whose value differs from the default."""
    defaults = RunConfig()
    for key in unused:
        value = config_value(config, key)
        if value != config_value(defaults, key):
            raise ConfigError(
                f"config key '{key}' is set to {value!r}, but {task} does not use it",
                hint=f"remove {key} from the config, flags and --set (it belongs to another task)",
            )


def refuse_keys_without_effect(config: RunConfig) -> None:
    """Refuse an SDXL key set to act on something the run does not have: the setting would do nothing."""
    lora, data = config.lora, config.data
    if lora.text_encoder_lr is not None and not lora.text_encoder:
        raise ConfigError(
            f"lora.text_encoder_lr={lora.text_encoder_lr} is set, but lora.text_encoder is off: no text "
            "encoder trains at that rate",
            hint="add --set lora.text_encoder=true to train the text encoders, or remove text_encoder_lr",
        )
    if data.prior_loss_weight != 1.0 and not any(source.reg for source in data.sources):
        raise ConfigError(
            f"data.prior_loss_weight={data.prior_loss_weight} is set, but no source holds class images: "
            "there is no prior loss to weigh",
            hint="add the class images with --reg-data DIR (a data.sources entry with reg: true), "
            "or remove prior_loss_weight",
        )
    if data.keep_tags and not data.shuffle_tags:
        raise ConfigError(
            f"data.keep_tags={data.keep_tags} is set, but data.shuffle_tags is off: no tag is shuffled, "
            "so keeping the first ones does nothing",
            hint="add --set data.shuffle_tags=true, or remove keep_tags",
        )


def check_evaluation_keys(config: RunConfig) -> None:
    """Refuse evaluation settings that would silently never evaluate or never keep a checkpoint."""
    output = config.output
    if output.eval_every and not output.eval_data:
        raise ConfigError(
            f"output.eval_every={output.eval_every} without output.eval_data: there is nothing to evaluate",
            hint="set output.eval_data to a held-out conversations file (or `tiny`), or remove eval_every",
        )
    best = output.keep_best
    if best == "validation_loss" and not (config.data.validation_fraction and output.validate_every):
        raise ConfigError(
            "output.keep_best=validation_loss needs a validation loss during training",
            hint="set data.validation_fraction > 0 and output.validate_every > 0",
        )
    if best is not None and best.startswith("eval/"):
        metric = best.removeprefix("eval/")
        if not output.eval_data:
            raise ConfigError(
                f"output.keep_best={best} without output.eval_data: nothing is evaluated",
                hint="set output.eval_data (Qwen-VL), or keep_best=validation_loss",
            )
        if metric not in (*METRICS, "overall"):
            raise ConfigError(
                f"output.keep_best={best}: no eval metric {metric!r}",
                hint=f"use eval/ followed by one of {', '.join([*METRICS, 'overall'])}",
            )


# Each recipe keeps the list of keys it does not read beside the code that reads the others (its
# UNUSED_KEYS, which refuse_unused_keys enforces); the report asks for that same list by task name.
# Imported lazily: the config layer sits below the recipes and must not load them to build a config.
_RECIPE_OF_TASK = {"sdxl-lora": "tuner.recipes.sdxl", "qwenvl-lora": "tuner.recipes.qwenvl"}


def keys_that_act(task: str) -> list[str] | None:
    """The config keys `task`'s recipe reads (every key but its UNUSED_KEYS); None for an unknown task."""
    from tuner.config.load import all_keys

    module = _RECIPE_OF_TASK.get(task)
    if module is None:
        return None
    unused = set(importlib.import_module(module).UNUSED_KEYS)
    return [key for key in all_keys() if key not in unused]
