"""Text from a cache made safe for a terminal: no character it could act on reaches it raw."""
from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: object, encoding: str | None = "utf-8") -> str:
    """`text` on one line, with every character a terminal could act on written as a backslash
    escape: control characters (newline, ESC, DEL, C1), Unicode format and separator characters
    (bidi overrides, U+2028), and whatever `encoding` cannot carry. An undecodable byte of a file
    name (a lone surrogate from os.fsdecode) is shown as the byte, `\\xff`; any other code point as
    `\\x1b`, `\\u202e` or `\\U000e0001`. A backslash itself stays: this is for reading, and
    `--json` carries the exact name."""
    text = str(text)
    if text.isprintable() and _fits(text, encoding):
        return text
    return "".join(ch if ch.isprintable() and _fits(ch, encoding) else _escape(ch) for ch in text)


def _fits(text: str, encoding: str | None) -> bool:
    try:
        text.encode(encoding or "utf-8")
    except UnicodeEncodeError:
        return False
    except LookupError:  # an encoding Python does not know: ASCII is safe everywhere
        return text.isascii()
    return True


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
