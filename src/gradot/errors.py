"""Every error the library raises on bad input, in one place.

Each is a ``GradotError`` (a ``ValueError``): the command line reports any of them as one line on
stderr and exit code 2; library callers catch ``GradotError`` or a specific class.
"""

from __future__ import annotations

import os
from pathlib import Path


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class GradotError(ValueError):
    """Base of the library's errors."""


class MethodConfigError(GradotError):
    """A compression method was asked for settings it cannot combine."""


class ArtifactError(GradotError):
    """An artifact is malformed, tampered with, or does not fit the model it is used with.

    The message is always one line (embedded library errors are collapsed and shortened).
    """

    def __init__(self, message: str):
        # Names in the message may come from the sender: no terminal control sequences reach the screen.
        super().__init__(printable(" ".join(str(message).split())))


class SplitError(GradotError):
    """The model cannot be split as asked."""


class ModelLoadError(GradotError):
    """The model named by the user cannot be found or loaded."""


class UnsupportedModelError(GradotError):
    """The model's architecture is not in the registry."""


class CompensationError(GradotError):
    """The emulator cannot be compensated (shared layers, unknown layout)."""


class CheckpointConflictError(GradotError):
    """``output_dir`` holds checkpoints that this run must not silently reuse or overwrite."""


class CellSettingsError(GradotError):
    """A folder of cached cells holds cells computed with other settings."""


class PipelineSettingsError(CellSettingsError):
    """The output folder holds cells computed with other settings."""


class CalibrationError(GradotError):
    """Calibration text is missing, empty or too short."""


class TaskDataError(GradotError):
    """A data file is malformed. The message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str):
        self.path = Path(path)
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{self.path}" + (f", line {line}" if line is not None else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")

    def __reduce__(self):
        # Rebuild from the parts, so the error survives pickling (e.g. DataLoader workers).
        return type(self), (self.path, self.line, self.field, self.problem)


class TokenCapError(GradotError):
    """A text encodes to more tokens than any tokenizer honestly makes of it (an expanding tokenizer)."""


class TaskDataUnavailableError(GradotError, FileNotFoundError):
    """No folder holds the task data a run needs and it cannot be fetched (no network, offline)."""


class UsageError(GradotError):
    """Bad command-line input (reported as one line, exit code 2)."""


class HealError(GradotError):
    """A healing attack or audit was asked for something it cannot do (settings, text, folders)."""
