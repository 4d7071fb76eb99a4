"""Build one validated RunConfig from its layers, later wins:

    built-in defaults < preset (--preset) < user file (--config) < explicit flags < --set dotted.key=value

Each layer is a nested dict. Keys are checked against the schema before validation so that an
unknown key is reported with the closest valid one, and pydantic's type errors are rewritten to
name the key, the value and the type wanted.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuner.atomic import write_atomically
from tuner.config.presets import load_preset
from tuner.config.schema import RunConfig
from tuner.errors import ConfigError

RESOLVED_CONFIG_NAME = "tuner_config.yaml"
# A preset is shared and reused; an escape hatch that turns TLS verification off must be a
# deliberate choice of the person running the job, never inherited from a file they did not write.
_SCIENTIFIC_NUMBER = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")
KEYS_PRESETS_MAY_NOT_SET = frozenset({"hub.insecure_skip_tls_verify"})


class _Null:
    def __repr__(self) -> str:
        return "NULL"


# A flag value that sets its key to None, where None itself means "flag not given" (`--data PATH` sets
# data.repeats to None: the folder's own repeats, whatever the config file says).
NULL = _Null()


def build_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    task: str | None = None,
) -> RunConfig:
    """Merge the layers and validate. `flags` maps dotted keys to values (None = not given, `NULL` = set
    to None)."""
    layers: list[tuple[str, dict]] = []
    if preset:
        preset_layer = load_preset(preset, task)
        for key in KEYS_PRESETS_MAY_NOT_SET:
            if _get_dotted(preset_layer, key):
                raise ConfigError(
                    f"preset '{preset}' sets {key}, which only the user may set",
                    hint="remove it from the preset and pass the flag yourself if you must",
                )
        layers.append((f"preset '{preset}'", preset_layer))
    if config_file:
        layers.append((str(config_file), read_config_file(config_file)))
    if flags:
        given = {key: None if value is NULL else value for key, value in flags.items() if value is not None}
        layers.append(("flags", _nest(given)))
    if overrides:
        layers.append(("--set", _nest(dict(parse_override(item) for item in overrides))))

    merged: dict = {}
    for origin, layer in layers:
        check_known_keys(layer, RunConfig, origin)
        merged = _deep_merge(merged, layer)
    if task:
        if merged.get("task") not in (None, task):
            raise ConfigError(
                f"the config is for task '{merged['task']}' but the command trains '{task}'",
                hint="use the matching `tuner train` command or another config file",
            )
        merged["task"] = task
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as error:
        raise _friendly_validation_error(error, merged) from None


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", hint="check the path passed to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(
            f"{where}: not valid YAML ({getattr(error, 'problem', error)})",
            hint="fix the YAML syntax at that line",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, data:, ...), got {type(data).__name__}",
            hint="see `tuner presets show tiny-cpu` for the layout",
        )
    data.pop("description", None)
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`train.max_steps=100` -> ("train.max_steps", 100). Values are read as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"--set {item!r} is not of the form dotted.key=value", hint="for example: --set optim.lr=5e-5"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads `5e-5` (no dot) as a string; people write learning rates that way.
    if isinstance(value, str) and _SCIENTIFIC_NUMBER.fullmatch(value.strip()):
        value = float(value)
    return key.strip(), value


def write_resolved_config(config: RunConfig, output_dir: str | Path) -> Path:
    """Write the fully resolved config; passing it back with --config reproduces the run."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RESOLVED_CONFIG_NAME
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def config_as_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def check_known_keys(layer: Mapping, model: type[BaseModel], origin: str, prefix: str = "") -> None:
    for key, value in layer.items():
        fields = model.model_fields
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{origin}: unknown config key '{dotted}'", hint=_suggestion(dotted, model, prefix)
            )
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, Mapping):
                example = f"{dotted}.{next(iter(annotation.model_fields))}"
                raise ConfigError(
                    f"{origin}: '{dotted}' is a section and needs a mapping, got {value!r}",
                    hint=f"set one of its keys instead, e.g. {example}=...",
                )
            check_known_keys(value, annotation, origin, prefix=f"{dotted}.")


def all_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggestion(dotted: str, model: type[BaseModel], prefix: str) -> str:
    candidates = all_keys()
    # A misplaced key (right name, wrong section) is the most common slip; then typos.
    leaf = dotted.rsplit(".", 1)[-1]
    close = [key for key in candidates if key.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    section = [f"{prefix}{name}" for name in model.model_fields]
    return "valid keys here: " + ", ".join(section)


def _friendly_validation_error(error: ValidationError, merged: Mapping) -> ConfigError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"] if not isinstance(part, int))
    value = first.get("input", _get_dotted(merged, location))
    message = first["msg"]
    if first["type"] == "literal_error":
        wanted = message.removeprefix("Input should be ")
    else:
        wanted = message[0].lower() + message[1:]
    more = f" ({len(error.errors()) - 1} more problem(s) after this one)" if len(error.errors()) > 1 else ""
    return ConfigError(
        f"config key '{location}' has value {value!r}: {wanted}{more}",
        hint=f"set a valid value, e.g. --set {location}=...",
    )


def _nest(flat: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in flat.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"'{dotted}' conflicts with another value given for '{part}'",
                    hint="give either the section's keys or a value, not both",
                )
        node[leaf] = value
    return nested


def _deep_merge(base: Mapping, update: Mapping) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _get_dotted(data: Mapping, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
