"""What every options dataclass does with values given from Python: "cpu" for ("cpu",), 8 for (8,), and threads
checked when the options are made (an int where a tuple goes was split into letters, or failed deep inside)."""

from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Any

from edgemap.errors import OptionError


def split_csv(value: str | None) -> list[str]:
    """"cpu, openvino" → ["cpu", "openvino"] (empty items dropped)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


#: more intra-op threads than this is a typo (ONNX Runtime's binding raised a bare TypeError past the int range)
MAX_THREADS = 1024


def _default(obj: Any, name: str) -> Any:
    import dataclasses

    f = next((f for f in dataclasses.fields(obj) if f.name == name), None)
    return f.default if f is not None else dataclasses.MISSING


def _whole(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


_VIRTUAL_OPENVINO = re.compile(r"openvino:(AUTO|HETERO|MULTI):", re.IGNORECASE)  # sessions.VIRTUAL_DEVICES + a list
_DEVICE_NAME = re.compile(r"[A-Z][A-Z0-9_]*(\.\d+)?")  # CPU, GPU.1, NPU: upper case, unlike runtime names


def split_runtimes(value: str | None) -> list[str]:
    """As :func:`split_csv`, keeping an OpenVINO device list whole: "openvino:AUTO:GPU,CPU,cpu" is
    ["openvino:AUTO:GPU,CPU", "cpu"] (its "CPU" was a second runtime: ONNX Runtime's)."""
    out: list[str] = []
    for item in split_csv(value):
        if out and _DEVICE_NAME.fullmatch(item) and _VIRTUAL_OPENVINO.match(out[-1]):
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def normalize(obj: Any, names: tuple[str, ...] = (), numbers: tuple[str, ...] = (), counts: dict[str, int] | None = None,
              seconds: tuple[str, ...] = (), flags: dict[str, str] | None = None, whole: tuple[str, ...] = (),
              reals: tuple[str, ...] = ()) -> None:
    """In a frozen dataclass's ``__post_init__``: comma-separated strings and lists become tuples of names
    (``names``) or of whole numbers (``numbers``); ``counts`` (name → minimum) are whole numbers, ``seconds`` finite
    numbers > 0; ``threads`` must be a whole number in 1..MAX_THREADS. None passes where it is the field's default.
    Messages name the option as the CLI spells it (``flags`` where that is not ``--<name>``)."""
    spelled = {"batches": "--batch", **(flags or {})}

    def flag(name: str) -> str:
        return spelled.get(name, "--" + name.replace("_", "-"))

    def unset(name: str, value: Any) -> bool:
        if value is not None:
            return False
        if _default(obj, name) is None:
            return True
        raise OptionError(f"{flag(name)} None: give a value (leave it out for the default, {_default(obj, name)!r})")

    for name in names:
        value = getattr(obj, name)
        if unset(name, value):
            continue
        if isinstance(value, str):
            value = tuple(split_runtimes(value) if name.endswith("runtimes") else split_csv(value))
        elif not isinstance(value, tuple):
            value = tuple(value)
        object.__setattr__(obj, name, value)
    for name in numbers:
        value = getattr(obj, name)
        if unset(name, value):
            continue
        items = (value,) if _whole(value) else tuple(split_csv(value)) if isinstance(value, str) else value
        try:  # "8" from a CSV and numpy integers: yes; 2.7 (was cut to 2) and True (was 1): no
            value = tuple(_as_whole(v) for v in items)
        except (TypeError, ValueError):
            raise OptionError(f"{flag(name)} {getattr(obj, name)!r}: must be whole numbers, e.g. 1,8") from None
        object.__setattr__(obj, name, value)
    for name, minimum in (counts or {}).items():
        value = getattr(obj, name)
        if unset(name, value):
            continue
        if not _whole(value) or value < minimum:
            raise OptionError(f"{flag(name)} {value!r}: must be a whole number >= {minimum}")
        object.__setattr__(obj, name, int(value))
    for name in whole:  # whole numbers, their ranges checked by the stage (2.5 images, "8" were used or crashed)
        value = getattr(obj, name)
        if not unset(name, value) and not _whole(value):
            raise OptionError(f"{flag(name)} {value!r}: must be a whole number")
    for name in reals:  # numbers ("1" was a bare TypeError deep inside)
        value = getattr(obj, name)
        if not unset(name, value) and (not isinstance(value, Real) or isinstance(value, bool)):
            raise OptionError(f"{flag(name)} {value!r}: must be a number")
    for name in seconds:
        value = getattr(obj, name)
        if unset(name, value):
            continue
        if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise OptionError(f"{flag(name)} {value!r}: must be a finite number of seconds > 0")
        object.__setattr__(obj, name, float(value))
    threads = getattr(obj, "threads", None)
    if _whole(threads):
        threads = int(threads)  # np.int64 from a sweep over np.arange
        object.__setattr__(obj, "threads", threads)
    if threads is not None and (not _whole(threads) or not 1 <= threads <= MAX_THREADS):
        raise OptionError(f"--threads {threads!r}: must be a whole number from 1 to {MAX_THREADS} "
                           "(leave it out for the physical cores)")


def recorded_value(field: Any, value: Any) -> Any:
    """An option value read back from edgemap.json, for dataclass ``field``: a whole float (300.0, as a config file
    or an older edgemap wrote it) where the field holds an int is that int, not refused as "must be a whole number"
    on a re-run the user never gave it to; 2.5 stays 2.5 (and is refused)."""
    kind = str(field.type)
    if isinstance(value, float) and value.is_integer() and "int" in kind and "float" not in kind:
        return int(value)
    return value


def _as_whole(v: Any) -> int:
    """A whole number given as one (numpy's too) or as text; anything else is a TypeError."""
    if _whole(v) or isinstance(v, str):
        return int(v)  # ValueError for text that is not a number
    raise TypeError(v)
