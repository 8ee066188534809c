"""What every options dataclass does with values given from Python: "cpu" for ("cpu",), 8 for (8,), and threads
checked when the options are made (an int where a tuple goes was split into letters, or failed deep inside)."""

from __future__ import annotations

from numbers import Integral
from typing import Any

from edgemap.errors import EdgemapError


def split_csv(value: str | None) -> list[str]:
    """"cpu, openvino" → ["cpu", "openvino"] (empty items dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def normalize(obj: Any, names: tuple[str, ...] = (), numbers: tuple[str, ...] = ()) -> None:
    """In a frozen dataclass's ``__post_init__``: comma-separated strings and lists become tuples of names
    (``names``) or of whole numbers (``numbers``); ``threads`` must be a positive whole number or None."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str):
            value = tuple(split_csv(value))
        elif value is not None and not isinstance(value, tuple):
            value = tuple(value)
        object.__setattr__(obj, name, value)
    for name in numbers:
        value = getattr(obj, name)
        if isinstance(value, Integral | str):
            value = (value,) if isinstance(value, Integral) else tuple(split_csv(value))
        try:
            value = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            flag = {"batches": "batch"}.get(name, name)  # as the CLI option is spelled
            raise EdgemapError(f"--{flag} {getattr(obj, name)!r}: must be whole numbers, e.g. 1,8") from None
        object.__setattr__(obj, name, value)
    threads = getattr(obj, "threads", None)
    if isinstance(threads, Integral) and not isinstance(threads, bool):
        threads = int(threads)  # np.int64 from a sweep over np.arange
        object.__setattr__(obj, "threads", threads)
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise EdgemapError(f"--threads {threads!r}: must be a positive whole number (leave it out for the physical cores)")
