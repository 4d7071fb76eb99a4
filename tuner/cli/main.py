"""The `tuner` command: a thin layer that parses, builds the config and calls library functions.

User errors (TunerError, bad flags) are printed as `error: ...` / `hint: ...` and exit 2; `--verbose`
keeps the traceback. Heavy libraries are imported inside commands so `tuner --help` stays fast and
hub settings (HF_ENDPOINT is read at import time) are applied before huggingface_hub is imported.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Annotated

import typer

try:  # typer >= 0.29 vendors click; earlier releases use the click package.
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_exceptions

from tuner import __version__
from tuner.cli import options
from tuner.cli.convert import convert_command
from tuner.cli.data import data_app
from tuner.cli.infer import infer_app
from tuner.cli.merge import merge_command
from tuner.cli.selftest import selftest_command
from tuner.cli.train import train_app
from tuner.errors import TunerError

app = typer.Typer(
    name="tuner",
    help="Fine-tune LoRA adapters for SDXL and the Qwen-VL family on Ascend NPUs, CUDA and CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
presets_app = typer.Typer(help="List and show the built-in presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
app.add_typer(infer_app, name="infer")
app.command("merge")(merge_command)
app.command("convert")(convert_command)
app.command("selftest")(selftest_command)

_verbose = False


def _version(value: bool) -> None:
    if value:
        print(f"tuner {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    global _verbose
    _verbose = verbose


@app.command("env")
def env_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    device: options.Device = None,
    mixed_precision: options.MixedPrecision = None,
    ca_bundle: options.CaBundle = None,
    hf_endpoint: options.HfEndpoint = None,
    offline: options.Offline = None,
    insecure_skip_tls_verify: options.InsecureSkipTlsVerify = None,
) -> None:
    """Show the device, versions, precision and hub settings a run would use (and NPU pre-flight checks)."""
    from tuner.runtime import apply_hub_settings, environment_report, format_environment_report

    for warning in apply_hub_settings(
        endpoint=hf_endpoint,
        ca_bundle=ca_bundle,
        offline=bool(offline),
        insecure_skip_tls_verify=bool(insecure_skip_tls_verify),
    ):
        print(f"warning: {warning}", file=sys.stderr)
    report = environment_report(device or "auto", mixed_precision or "auto")
    print(json.dumps(report, indent=2, default=str) if as_json else format_environment_report(report))


@presets_app.command("list")
def presets_list() -> None:
    """List the presets with their one-line description."""
    from tuner.config.presets import preset_description, preset_names

    names = preset_names()
    width = max(len(name) for name in names)
    for name in names:
        summary = preset_description(name).split(". ")[0].rstrip(".")
        print(f"{name:<{width}}  {summary}")


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name, see `tuner presets list`.")]) -> None:
    """Print a preset resolved over the built-in defaults (the config a run with it starts from)."""
    from tuner.config.load import build_config, config_as_yaml
    from tuner.config.presets import preset_description

    config = build_config(preset=name)
    print(f"# {name}: {' '.join(preset_description(name).split())}")
    print(config_as_yaml(config), end="")


@app.command(
    "launch",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def launch_command(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the command instead of running it.")
    ] = False,
    socket_ifname: Annotated[
        str | None, typer.Option("--socket-ifname", help="Network interface for HCCL/NCCL/gloo, e.g. eth0.")
    ] = None,
    device: options.Device = None,
) -> None:
    """Start `accelerate launch` on this node from the cluster's environment (plain, ModelArts, PyTorchJob).

    Everything after the options is passed to tuner, e.g. `tuner launch -- train sdxl-lora --preset ...`.
    """
    import os
    import socket

    from tuner.launch import accelerate_command, collective_settings, detect_topology, format_command
    from tuner.runtime import resolve_runtime

    runtime = resolve_runtime(device or "auto")
    topology = detect_topology(os.environ, runtime.device_count, socket.gethostname())
    if not topology.should_launch:
        print("launch: legacy per-card boot mode; the copy on device 0 starts the launcher for this node")
        return
    settings = collective_settings(runtime.device_type, socket_ifname, os.environ)
    command = accelerate_command(topology, ctx.args, device_type=runtime.device_type)
    print(
        f"launch: {topology.platform} job, node {topology.machine_rank + 1} of {topology.num_machines}, "
        f"{topology.processes_per_machine} process(es) per node"
    )
    print(format_command(settings, command), flush=True)
    if not dry_run:
        os.execvpe(command[0], command, {**os.environ, **settings})


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and renders user errors as one or two lines."""
    try:
        # With standalone_mode=False, typer returns the code of a `typer.Exit` instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except TunerError as error:
        _fail(error.message, error.hint, error.exit_code)
    except click_exceptions.NoArgsIsHelpError as error:
        print(error.ctx.get_help() if error.ctx else error.format_message())
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        _fail("aborted", None, 130)
    except click_exceptions.UsageError as error:
        command = error.ctx.command_path if error.ctx else "tuner"
        _fail(error.format_message(), f"see `{command} --help`", 2)


def _fail(message: str, hint: str | None, code: int) -> None:
    if _verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(code)
