"""Text from files, folders and models shown safely: names are data, never terminal commands or extra lines."""

from __future__ import annotations

import unicodedata


def has_control_chars(text: str) -> bool:
    """Tab, newline, escape, line separators and the other control characters: in a class name they forge output
    lines and drive terminals (``\\x1b]0;...``)."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text)


def printable(text: str, keep: str = "") -> str:
    """``text`` writable as UTF-8 and shown as it is: bytes of a file name that is not UTF-8 (``caf\\xe9.png``, from
    Windows or SMB shares) and non-printable characters (tab, newline, ESC, U+2028, CSI) become ``\\xNN`` /
    ``\\uNNNN`` escapes, so a name can neither forge a result line nor drive a terminal. ``keep``: characters left as
    they are (the CLI keeps its own newlines)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch in keep else (f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
                   for ch in text)
