"""`tuner report RUN_DIR`: write the run's self-contained report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A training output folder (the --output of a run).")],
) -> None:
    """Write RUN_DIR/report.html: curves, eval scores, samples, data problems, config, device, versions.

    One file with everything embedded (no network): download it from a cluster and open it anywhere.
    """
    from tuner.config.load import RESOLVED_CONFIG_NAME
    from tuner.errors import ConfigError
    from tuner.report.html import ENVIRONMENT_FILE, write_run_report
    from tuner.training.metrics import METRICS_FILE

    if not (run_dir / RESOLVED_CONFIG_NAME).is_file() and not (run_dir / METRICS_FILE).is_file():
        raise ConfigError(
            f"{run_dir} is not a training output folder (no tuner_config.yaml or metrics.jsonl)",
            hint="pass the --output folder of a `tuner train` run",
        )
    environment = None
    if not (run_dir / ENVIRONMENT_FILE).is_file():
        # A run from before reports existed: record this machine, and say so in the report.
        from tuner.report.html import this_environment

        environment = {**this_environment(), "recorded_by": "tuner report"}
    print(f"wrote {write_run_report(run_dir, environment)}")
