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
from tuner.cli.class_images import generate_class_images_command
from tuner.cli.convert import convert_command
from tuner.cli.data import data_app
from tuner.cli.eval import eval_app
from tuner.cli.infer import infer_app
from tuner.cli.merge import merge_command
from tuner.cli.report import report_command
from tuner.cli.selftest import selftest_command
from tuner.cli.serve import serve_command
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
app.add_typer(eval_app, name="eval")
app.command("merge")(merge_command)
app.command("report")(report_command)
app.command("convert")(convert_command)
app.command("generate-class-images")(generate_class_images_command)
app.command("selftest")(selftest_command)
app.command("serve-command")(serve_command)

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
    check_hub: Annotated[
        bool,
        typer.Option(
            "--check-hub",
            help="Also connect to the hub: TLS verification, certificates presented, proxy, one small fetch.",
        ),
    ] = False,
    hub: options.Hub = None,
    model: Annotated[
        str | None, typer.Option("--model", help="With --check-hub: a hub ID whose config.json to fetch.")
    ] = None,
) -> None:
    """Show the device, versions, precision and hub settings a run would use (and NPU pre-flight checks).

    With --check-hub it exits 1 when a download from the hub would fail.
    """
    options.apply_hub_flags(ca_bundle, hf_endpoint, offline, insecure_skip_tls_verify)
    from tuner.runtime import environment_report, format_environment_report

    report = environment_report(device or "auto", mixed_precision or "auto")
    text = format_environment_report(report)
    if check_hub:
        from tuner.runtime.hub_check import check_hub as run_hub_check
        from tuner.runtime.hub_check import format_hub_check

        report["hub_check"] = run_hub_check(hub or "huggingface", model, bool(insecure_skip_tls_verify))
        text += "\n\n" + format_hub_check(report["hub_check"])
    print(json.dumps(report, indent=2, default=str) if as_json else text)
    if check_hub and not report["hub_check"]["ok"]:
        raise typer.Exit(1)


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

    _check_tuner_command(ctx)
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


def _check_tuner_command(ctx: typer.Context) -> None:
    """Refuse what `launch` would otherwise pass through unread: the command must start with a tuner command.

    `ignore_unknown_options` lets the training command's own options through, but it also lets a
    mistyped launch option (`--from-env`) through, to fail later on every node.
    """
    group = ctx.parent.command if ctx.parent else None
    commands = getattr(group, "commands", {})
    root_options = {option for parameter in getattr(group, "params", []) for option in parameter.opts}
    args = list(ctx.args)
    while args and args[0] in root_options:
        args.pop(0)
    if args and args[0] in commands:
        return
    if not args:
        message = "tuner launch needs the tuner command to start"
    elif args[0].startswith("-"):
        message = f"No such option: {args[0]}"
    else:
        message = f"{args[0]!r} is not a tuner command"
    raise click_exceptions.UsageError(
        f"{message} (launch takes --dry-run, --socket-ifname and --device, then a tuner command such as "
        "`train sdxl-lora ...`)",
        ctx,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the app and renders user errors as one or two lines."""
    try:
        # With standalone_mode=False, typer returns the code of a `typer.Exit` instead of exiting.
        code = _run(argv)
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


def _run(argv: list[str] | None) -> object:
    try:
        return app(args=argv, standalone_mode=False)
    except (click_exceptions.ClickException, typer.Exit, typer.Abort):
        raise  # usage errors: no need to import the runtime (and torch) to look inside them
    except Exception as error:
        # Whichever command touched a hub and however the libraries wrapped it, an untrusted TLS
        # certificate is reported as one HubError that names the certificate and the fix.
        from tuner.runtime.hub import hub_error_from

        hub_error = hub_error_from(error)
        if hub_error is None:
            raise
        raise hub_error from error


def _fail(message: str, hint: str | None, code: int) -> None:
    if _verbose:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(code)
