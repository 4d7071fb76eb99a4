"""Stop requests from outside: SIGTERM (preemption, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (schedulers'
"checkpoint and go").

The first signal only sets a flag: the loop finishes the optimizer step it is in, writes a
checkpoint and raises `TrainingInterrupted`, whose exit code is 128 + the signal number (the shell's
own convention): 143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1. A second SIGINT aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from tuner.errors import TunerError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class TrainingInterrupted(TunerError):
    """The run stopped on a signal after writing a checkpoint; `--resume latest` continues it."""

    def __init__(self, message: str, hint: str, signal_number: int) -> None:
        super().__init__(message, hint)
        self.exit_code = 128 + signal_number


class StopRequests:
    """While entered, the stop signals set `requested` instead of killing the process.

    Only the main thread can install signal handlers; elsewhere (a training run started from a
    worker thread) the process keeps its handlers and `requested` stays None.
    """

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested is not None and number == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        if self.requested is None:
            self.requested = signal.Signals(number)
            print(
                f"\n{self.requested.name} received: finishing this step and writing a checkpoint "
                "(press Ctrl-C again to abort without one)",
                file=sys.stderr,
                flush=True,
            )
