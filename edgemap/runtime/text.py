"""Text from files, folders and models shown safely: names are data, never terminal commands or extra lines."""

from __future__ import annotations

import unicodedata


def one_line(error: object) -> str:
    """An engine's error text on one line (ONNX Runtime and OpenVINO end theirs with newlines; a device showed \\x0a)."""
    return " ".join(str(error).split())


def has_control_chars(text: str) -> bool:
    """Tab, newline, escape, line separators and the other control characters: in a class name they forge output
    lines and drive terminals (``\\x1b]0;...``)."""
    return any(unicodedata.category(ch) in _CONTROL for ch in text)


def printable(text: str, keep: str = "", controls: bool = True) -> str:
    """``text`` writable as UTF-8 and shown as it is: bytes of a file name that is not UTF-8 (``caf\\xe9.png``, from
    Windows or SMB shares) become ``\\xNN`` escapes, and so do control characters and line separators (tab,
    newline, ESC, CSI, U+0085, U+2028): a name can neither forge a result line nor drive a terminal. Everything else
    (no-break spaces, zero-width joiners, right-to-left marks...) stays, so the name still names the file.
    ``keep``: characters left as they are (the CLI keeps its own newlines). ``controls=False``: only the bytes that
    are not UTF-8 (for JSON, which escapes control characters itself and must give back the real path)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not controls or not has_control_chars(text):
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in _CONTROL and ch not in keep else ch for ch in text)


_CONTROL = ("Cc", "Zl", "Zp")


def _escape(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
