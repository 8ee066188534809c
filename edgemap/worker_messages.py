"""The error line of each training process of ``edgemap finetune --nproc N``.

Each rank leaves its line in a folder (named by ``EDGEMAP_WORKER_MESSAGES``) instead of printing it, and the
launcher prints the one that matters, once: N ranks that meet the same bad dataset printed it N times. Plain
Python (no torch, no rich): the CLI, the launcher and the torchrun agent all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

#: Set by `edgemap finetune --nproc N` for its training processes: the folder of their error lines.
ENV = "EDGEMAP_WORKER_MESSAGES"
#: what an interrupted command says after "interrupted by SIGINT: "
INTERRUPTED_TAIL = "files being written were discarded, earlier artifacts are untouched; run the command again"


def _rank_file(folder: str, suffix: str) -> Path:
    return Path(folder) / f"rank{os.environ.get('RANK', '0')}.{suffix}"


def leave(kind: str, text: str) -> bool:
    """Under ``--nproc``: leave this rank's line (``kind`` "error" or "interrupted") for the launcher. False when
    this is no training process of a launch (or the folder cannot be written: the caller prints it itself)."""
    folder = os.environ.get(ENV)
    if not folder:
        return False
    from edgemap.fsutil import atomic_write_json

    try:
        atomic_write_json(_rank_file(folder, "json"), {"kind": kind, "text": text})
    except OSError:
        return False
    return True


def mark_done() -> None:
    """A training process finished its run: said to the launcher, which otherwise takes a Ctrl-C in the last
    moments (no message from any rank) for one before training started."""
    folder = os.environ.get(ENV)
    if folder:
        with contextlib.suppress(OSError):
            _rank_file(folder, "done").touch()


def read(folder: str | Path, first: int | None = None) -> tuple[str, str] | None:
    """(kind, text) of rank ``first``'s line, else the lowest rank's; None when no rank left one."""
    found: dict[int, dict[str, str]] = {}
    for f in Path(folder).glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            found[int(f.stem[4:])] = json.loads(f.read_text(encoding="utf-8"))
    if not found:
        return None
    msg = found.get(first) if first is not None and first in found else found[min(found)]
    return str(msg.get("kind", "error")), str(msg.get("text", ""))


def as_line(kind: str, text: str) -> str:
    """The line a command prints for it (without colours)."""
    return f"interrupted by {text}: {INTERRUPTED_TAIL}" if kind == "interrupted" else f"error: {text}"
