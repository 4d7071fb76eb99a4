"""`tuner selftest`: train, merge and infer the tiny models on this machine's devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuner.cli import options


def selftest_command(
    device: options.Device = None,
    all_devices: Annotated[
        bool, typer.Option("--all-devices", help="Test every device this machine has (CPU included).")
    ] = False,
    work_dir: Annotated[
        Path | None,
        typer.Option("--work-dir", help="Keep the trained adapters and outputs here (default: deleted)."),
    ] = None,
) -> None:
    """Build the tiny models, train each recipe a few steps, merge and infer; print a pass/fail table."""
    from tuner.selftest import format_results, run_selftest, selftest_devices

    devices = selftest_devices(device, all_devices)
    print(f"selftest on {', '.join(devices)} (tiny models, nothing downloaded)", flush=True)
    results = run_selftest(devices, work_dir)
    print(format_results(results))
    if any(result.status == "fail" for result in results):
        raise typer.Exit(1)
