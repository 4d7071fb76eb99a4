"""Which config keys a task reads: a key one recipe cannot honour is refused there, never ignored.

The schema is shared by every task, so it holds keys that only one model family can act on (SDXL's
`data.resolution`, Qwen-VL's `data.max_pixels`). Each recipe lists the keys it does not read; a run
that sets one of them to anything but the built-in default stops before any work with the key named,
instead of training something other than what the config says.
"""

from __future__ import annotations

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
