"""Experiment trackers (`--log-with tensorboard|wandb|swanlab|mlflow`) through Accelerate's tracker API.

The recipe starts them once (`start_trackers`: `accelerator.init_trackers` with the resolved config as
hyper-parameters); the loop's `MetricsLog` sends every scalar to `accelerator.trackers`; the recipe ends
them (`finish_trackers`). Every tracker writes beside the run by default, so each works without
a network: TensorBoard event files in OUTPUT/tensorboard, an MLflow file store in OUTPUT/mlruns (unless
MLFLOW_TRACKING_URI is set), W&B in offline mode and SwanLab in local mode when the run is offline
(`hub.offline`, HF_HUB_OFFLINE) or WANDB_MODE / SWANLAB_MODE say so.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuner.errors import ConfigError

# Where the offline trackers write inside the run folder.
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
SWANLAB_DIR = "swanlog"
WANDB_DIR = "wandb"  # W&B names the folder itself, inside the `dir` it is given

# tracker name -> (module it needs, tuner extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "swanlab": ("swanlab", "swanlab"),
    "mlflow": ("mlflow", "mlflow"),
}


def check_trackers(names: Sequence[str]) -> None:
    """Refuse an unknown tracker or one whose package is missing, before any model loads."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"unknown tracker {name!r} in output.log_with", hint=f"choose from {', '.join(TRACKERS)}"
            )
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--log-with {name} needs the {module} package, which is not installed",
                hint=f"pip install 'tuner[{extra}]' (or pip install {module})",
            )


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """`{"optim": {"lr": 1e-4}}` -> `{"optim.lr": 1e-4}`: trackers take flat scalar hyper-parameters."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, str | int | float | bool):
            flat[name] = value
        else:  # None, lists, tuples: shown as text
            flat[name] = str(value)
    return flat


def start_trackers(
    accelerator, names: Sequence[str], output_dir: Path, config: Mapping[str, Any], offline: bool
) -> None:
    """Start the named trackers on the main process with `config` (flattened) as hyper-parameters."""
    if not names or not accelerator.is_main_process:
        return
    check_trackers(names)
    from accelerate.tracking import MLflowTracker, SwanLabTracker, TensorBoardTracker, WandBTracker

    run_name = output_dir.resolve().name
    offline = offline or os.environ.get("HF_HUB_OFFLINE") == "1"
    trackers = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_name, output_dir / TENSORBOARD_DIR))
        elif name == "mlflow":
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                # Set in mlflow, not in the environment, so that the next run in this process (tests,
                # notebooks) gets its own store. mlflow >= 3.17 refuses a file store unless this opt-out
                # is set; a database store needs SQLAlchemy, which mlflow-skinny leaves out.
                mlflow.set_tracking_uri((output_dir / MLFLOW_DIR).resolve().as_uri())
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            trackers.append(MLflowTracker(experiment_name="tuner", run_name=run_name))
        elif name == "wandb":
            if offline:
                os.environ.setdefault("WANDB_MODE", "offline")
            trackers.append(WandBTracker("tuner", name=run_name, dir=str(output_dir)))
        else:
            mode = os.environ.get("SWANLAB_MODE") or ("offline" if offline else None)
            options = {"mode": mode} if mode else {}
            trackers.append(
                SwanLabTracker(
                    "tuner", experiment_name=run_name, logdir=str(output_dir / SWANLAB_DIR), **options
                )
            )
    # The Accelerator is built before the config's trackers are read (tuner.runtime builds it for every
    # command); init_trackers takes ready tracker objects from log_with as they are.
    accelerator.log_with = trackers
    accelerator.init_trackers("tuner", config=flat_config(config))


def finish_trackers(accelerator) -> None:
    """Flush and close the run's trackers. Not `accelerator.end_training()`: Accelerate 1.15's also
    destroys the process group, and the recipe still needs it to save the adapter on every process."""
    for tracker in accelerator.trackers:
        tracker.finish()


def log_sample_images(accelerator, step: int, paths: Sequence[Path], name: str = "samples") -> None:
    """Send sample grids (PNG files) to every tracker that takes images."""
    import numpy as np
    from PIL import Image

    trackers = [t for t in getattr(accelerator, "trackers", []) if _implements(t, "log_images") or _mlflow(t)]
    if not trackers:
        return
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in paths]
    for tracker in trackers:
        if _mlflow(tracker):
            # Accelerate 1.15's MLflowTracker has no log_images; MLflow's own call keeps them by step.
            import mlflow

            for index, array in enumerate(arrays):
                mlflow.log_image(array, key=f"{name}-{index}" if len(arrays) > 1 else name, step=step)
        elif tracker.name == "tensorboard":
            # Accelerate hands the value to SummaryWriter.add_images, which takes one NCHW array by default.
            tracker.log_images({name: np.stack(arrays)}, step=step, dataformats="NHWC")
        else:  # W&B, SwanLab: a list of images
            tracker.log_images({name: arrays}, step=step)


def log_sample_answers(accelerator, step: int, rows: Sequence[Mapping[str, str]]) -> None:
    """Send sample answers (question, answer, reference) as a table to trackers that take tables
    (W&B: a table; TensorBoard and SwanLab: a Markdown table as text; MLflow: the same as a text
    artifact per step)."""
    columns = ["question", "answer", "reference"]
    data = [[str(row.get(column, "")) for column in columns] for row in rows]
    text = "\n".join(f"| {' | '.join(row)} |" for row in [columns, ["---"] * 3, *data])
    for tracker in getattr(accelerator, "trackers", []):
        if _implements(tracker, "log_table"):
            tracker.log_table("sample_answers", columns=columns, data=data, step=step)
        elif tracker.name == "tensorboard":
            tracker.tracker.add_text("sample_answers", text, step)
        elif tracker.name == "swanlab":
            # Accelerate 1.15's SwanLabTracker has no log_table; SwanLab shows Text media per step.
            import swanlab

            tracker.log({"sample_answers": swanlab.Text(text)}, step=step)
        elif _mlflow(tracker):
            import mlflow

            mlflow.log_text(text, f"sample_answers/step-{step:06d}.md")


def _mlflow(tracker: Any) -> bool:
    return getattr(tracker, "name", None) == "mlflow"


def _implements(tracker: Any, method: str) -> bool:
    """True when the tracker class overrides `method` (GeneralTracker's own versions do nothing)."""
    from accelerate.tracking import GeneralTracker

    own = getattr(type(tracker), method, None)
    return own is not None and own is not getattr(GeneralTracker, method, None)
