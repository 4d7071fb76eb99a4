"""The shared training loop and what it needs: optimizers, schedules, checkpoints and metrics."""

from tuner.training.loop import LoopResult, LoopSettings, TrainingJob, run_training, settings_from_config
from tuner.training.optim import build_lr_scheduler, build_optimizer

__all__ = [
    "LoopResult",
    "LoopSettings",
    "TrainingJob",
    "build_lr_scheduler",
    "build_optimizer",
    "run_training",
    "settings_from_config",
]
