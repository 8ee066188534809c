"""The typed error hierarchy of edgemap (re-exports the runtime's base errors)."""

from __future__ import annotations

from edgemap.runtime.errors import (
    EdgemapError,
    ImageError,
    InferenceError,
    ModelFormatError,
    ModelIntegrityError,
    OptionError,
    ProviderFallbackError,
    RuntimeUnavailableError,
)

__all__ = [
    "EdgemapError",
    "ImageError",
    "InferenceError",
    "ModelFormatError",
    "ModelIntegrityError",
    "OptionError",
    "ProviderFallbackError",
    "RuntimeUnavailableError",
    "DatasetError",
    "ManifestError",
    "RunBusyError",
    "RunNotWritableError",
    "OutputNotWritableError",
    "BackboneError",
    "TrainingError",
    "ResumeError",
    "ExportError",
    "ParityError",
    "QuantizationError",
    "AccuracyGateError",
    "PackageError",
    "Interrupted",
]


class DatasetError(EdgemapError):
    """The dataset folder is unusable (missing, empty class, class mismatch, bad file)."""


class ManifestError(EdgemapError):
    """edgemap.json is missing, unreadable, or has wrong types / missing keys."""


class RunNotWritableError(ManifestError):
    """The run directory cannot be written (permissions, a read-only mount): exit 74, as any refused write."""

    exit_code = 74


class OutputNotWritableError(EdgemapError):
    """A file the user named (``--json FILE``) cannot be written: permissions, read-only, disk full: exit 74."""

    exit_code = 74


class RunBusyError(EdgemapError):
    """Another edgemap process is writing to the same run directory."""

    exit_code = 75  # EX_TEMPFAIL: try again when the other command has finished


class BackboneError(EdgemapError):
    """Unknown backbone, or its weights package is not installed."""


class TrainingError(EdgemapError):
    """Training cannot go on (NaN/Inf loss, bad options)."""


class ResumeError(EdgemapError):
    """``--resume`` on a missing, corrupt or incompatible run."""


class ExportError(EdgemapError):
    """ONNX export failed (unsupported op at opset, IR version too new, no weights)."""


class ParityError(ExportError):
    """A runtime's outputs differ from PyTorch's beyond tolerance: exit 3, a check failed (not a mistake in input)."""

    exit_code = 3


class QuantizationError(EdgemapError):
    """int8 quantization cannot run (calibration set empty or too small...)."""


class AccuracyGateError(QuantizationError):
    """No int8 attempt stayed within ``--max-drop`` of fp32 accuracy: exit 3, a check failed."""

    exit_code = 3

    def __init__(self, message: str, attempts: list | None = None):
        super().__init__(message)
        self.attempts = attempts or []


class PackageError(EdgemapError):
    """A wheel cannot be built (bad name/version, missing artifact)."""


class Interrupted(KeyboardInterrupt):
    """The user interrupted a stage (Ctrl-C / SIGTERM); a resumable state was saved. Exit 130, or 143 for SIGTERM
    (``signum``), as the shell reports a process those signals ended.

    A KeyboardInterrupt (with the message saying how to continue), not an EdgemapError: a script's
    ``except EdgemapError`` (or ``except Exception``) around a sweep must not swallow the user's Ctrl-C.
    """

    exit_code = 130

    def __init__(self, message: str = "", signum: int | None = None):
        super().__init__(message)
        if signum == 15:  # SIGTERM (Windows has no signal module value for it in every build)
            self.exit_code = 143


class ResultsNotStored(OSError):
    """eval or bench measured, but the run could not store the results (its disk is full, or read-only): an OSError
    (exit 74, naming the folder) that carries what was measured in ``result`` (an EvalResult, or bench's rows), so
    the table is still shown and nothing measured is lost."""

    def __init__(self, error: OSError, result: object):
        super().__init__(error.errno, error.strerror or str(error), error.filename)
        self.result = result
