"""Errors the library raises; `cli.py` turns them into one line and an exit status."""

from __future__ import annotations


class LorasbError(Exception):
    """Base of every error lorasb reports to a user.

    `message` says what is wrong, `path` names the file or directory involved, `hint` says how to fix it.
    The CLI prints `Error: <message> (<path>) — <hint>`.
    """

    exit_status = 1

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.hint = hint

    def one_line(self) -> str:
        text = self.message
        if self.path:
            text += f" ({self.path})"
        if self.hint:
            text += f" — {self.hint}"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class BadInputError(LorasbError):
    """Bad usage or bad input: options, data, models or files the user must change (exit 2)."""

    exit_status = 2


class IncompatibleArtifactError(BadInputError):
    """An artifact that does not fit the model, the stage or the other artifacts it is used with (exit 2)."""


class NonFiniteError(BadInputError):
    """NaN or Inf in gradients or tensors; names the module (exit 2)."""


class Interrupted(LorasbError):
    """A run stopped by a signal after saving what it needs to resume: exit 128 + the signal (130 SIGINT,
    143 SIGTERM)."""

    def __init__(self, message: str, *, signum: int, path: str | None = None, hint: str | None = None):
        super().__init__(message, path=path, hint=hint)
        self.exit_status = 128 + signum


class RunFailure(LorasbError):
    """A failure while running that is not the input's fault (exit 1)."""
