"""Typed errors shared by edgemap and the torch-free device runtime.

Every user-facing mistake raises an :class:`EdgemapError` whose one-line message names
the file or option at fault and the fix. The CLI prints that line and exits non-zero;
``EDGEMAP_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations


class EdgemapError(Exception):
    """Base class of every error edgemap reports to a user."""

    exit_code = 2


class ImageError(EdgemapError):
    """An image cannot be decoded or is refused (corrupt, truncated, bomb)."""


class ModelIntegrityError(EdgemapError):
    """A model file does not match the sha256 recorded for it, or is unsafe to load."""


class OptionError(EdgemapError):
    """An option's value is wrong (an unknown runtime name, a negative count...): the caller's mistake, not this
    machine's (``except RuntimeUnavailableError`` in a sweep no longer swallows a typo)."""


class RuntimeUnavailableError(EdgemapError):
    """A runtime was asked for but cannot run here (package, device or driver missing)."""


class InferenceError(EdgemapError):
    """A runtime failed while running a batch (out of memory, a driver or kernel error): the model loaded."""


class ProviderFallbackError(EdgemapError):
    """A session silently ran on another provider/device than the one asked for."""


class ModelFormatError(EdgemapError):
    """A model file is not a valid edgemap model (metadata missing, bad external data...)."""


#: every error a device meets (the device wheel's package exports them all: edgemap.package)
__all__ = ["EdgemapError", "ImageError", "InferenceError", "ModelFormatError", "ModelIntegrityError", "OptionError",
           "ProviderFallbackError", "RuntimeUnavailableError"]
