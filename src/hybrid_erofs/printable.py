"""Text from archives, made safe to print: control characters, bidi overrides and bytes that are
not UTF-8 are escaped, so a crafted name cannot forge output lines or rewrite the terminal.
"""

from __future__ import annotations

import time

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}
# Characters that reorder or break lines on a terminal without being control characters
# (Unicode "Trojan Source" bidi controls, line and paragraph separators).
_INVISIBLE = frozenset("\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e"
                       "\u2066\u2067\u2068\u2069")


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _needs_escape(char: str) -> bool:
    code = ord(char)
    return (code < 0x20 or 0x7F <= code < 0xA0 or 0xD800 <= code <= 0xDFFF
            or char in _INVISIBLE)


def printable(value: str | bytes, *, backslash: bool = True) -> str:
    """`value` (bytes are read as UTF-8, undecodable bytes kept) with every character a
    terminal would act on escaped as \\n, \\r, \\t, \\e, \\xNN or \\uNNNN. With `backslash`
    (the default, for names) a backslash becomes \\\\ so that escapes are unambiguous."""
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if text.isprintable() and not (backslash and "\\" in text) and text.isascii():
        return text
    out: list[str] = []
    for char in text:
        if char == "\\" and backslash:
            out.append("\\\\")
        elif _needs_escape(char):
            out.append(_escape_char(char))
        else:
            out.append(char)
    return "".join(out)


def printable_message(text: str) -> str:
    """A whole message (ours, quoting archive data): control characters escaped, backslashes
    kept as they are."""
    return printable(text, backslash=False)


def format_time(seconds: int) -> str:
    """UTC `YYYY-MM-DD HH:MM:SS`, or `@SECONDS` for a time outside what the C library can
    show (tar allows 2**63 - 1 and below 0 in GNU base-256 fields)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"@{seconds}"


__all__ = ["format_time", "printable", "printable_message"]
