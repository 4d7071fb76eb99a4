"""Errors a user can cause. The CLI renders them as `error: ...` / `hint: ...` and exits 2.

Anything that is not a TunerError is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunerError(Exception):
    """A problem the user can fix: bad input, a missing file, an impossible setting."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ConfigError(TunerError):
    """An unknown key, a value of the wrong type, an unknown preset or a conflicting setting."""


class DataError(TunerError):
    """A dataset problem: names the file (and line or record), what is wrong and how to fix it."""


class ModelError(TunerError):
    """A model that cannot be found, loaded or used (unsupported family, pickle-only weights...)."""


class DeviceError(TunerError):
    """A device or precision request this machine cannot honour."""


class CheckpointError(TunerError):
    """A checkpoint that is missing, partial or from a different run."""


class HubError(TunerError):
    """A model hub that cannot be reached or trusted: an untrusted TLS certificate, DNS, a proxy."""
