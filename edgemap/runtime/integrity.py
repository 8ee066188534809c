"""sha256 of files and the refusal of models that changed since they were recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgemap.runtime.errors import ModelIntegrityError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise ModelIntegrityError when ``path`` does not hash to ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path}: sha256 {actual} does not match the recorded {expected}; "
            "the file changed after it was made. Re-run the stage that wrote it "
            "(e.g. `edgemap export RUN_DIR`) instead of editing artifacts by hand."
        )
