"""containerd's filter language for List: `labels."containerd.io/snapshot.ref"==X,parent=="Y"`.

Grammar as containerd's filters/parser.go; selectors joined by `,` must all match; several
filter strings match when any one does. Fields are matched as containerd's snapshot adaptor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from ..errors import SnapshotInvalid

_QUOTES = {'"', "/", "|"}
_SEPARATORS = {",", "."}
_OPERATORS = ("==", "!=", "~=")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}


@dataclass(frozen=True, slots=True)
class Selector:
    """One `fieldpath op value` (op "" = presence test)."""

    fieldpath: tuple[str, ...]
    operator: str
    value: str

    def match(self, field: Field) -> bool:
        value, present = field(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return re.search(self.value, value) is not None


Filter = tuple[Selector, ...]
Field = Callable[[tuple[str, ...]], tuple[str, bool]]  # fieldpath -> (value, present)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.offset = 0

    def fail(self, what: str) -> SnapshotInvalid:
        return SnapshotInvalid(f"filter {self.text!r}: {what} at offset {self.offset}")

    def skip_space(self) -> None:
        while self.offset < len(self.text) and self.text[self.offset].isspace():
            self.offset += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.offset] if self.offset < len(self.text) else ""

    def quoted(self) -> str:
        """Go string syntax with `"`, or `/` and `|` as quotes (for regular expressions)."""
        quote = self.text[self.offset]
        self.offset += 1
        out: list[str] = []
        while True:
            if self.offset >= len(self.text) or self.text[self.offset] == "\n":
                raise self.fail("quoted literal not terminated")
            char = self.text[self.offset]
            self.offset += 1
            if char == quote:
                return "".join(out)
            if char != "\\":
                out.append(char)
                continue
            if self.offset >= len(self.text):
                raise self.fail("quoted literal not terminated")
            esc = self.text[self.offset]
            self.offset += 1
            if esc in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[esc])
            elif esc == quote:
                out.append(quote)
            elif esc in "01234567":
                digits = self.text[self.offset - 1:self.offset + 2]
                if not re.fullmatch(r"[0-7]{3}", digits):
                    raise self.fail("illegal numeric escape sequence")
                out.append(chr(int(digits, 8)))
                self.offset += 2
            elif esc in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[esc]
                digits = self.text[self.offset:self.offset + width]
                if not re.fullmatch(rf"[0-9a-fA-F]{{{width}}}", digits):
                    raise self.fail("illegal numeric escape sequence")
                out.append(chr(int(digits, 16)))
                self.offset += width
            else:
                raise self.fail("illegal escape sequence")

    def field(self) -> str:
        char = self.peek()
        if char == '"':
            return self.quoted()
        match = re.compile(r"[A-Za-z0-9_]+").match(self.text, self.offset)
        if match is None:
            raise self.fail("expected field or quoted")
        self.offset = match.end()
        return match.group()

    def operator(self) -> str:
        self.skip_space()
        for op in _OPERATORS:
            if self.text.startswith(op, self.offset):
                self.offset += 2
                return op
        raise self.fail("expected an operator (==, != or ~=)")

    def value(self, *, regexp: bool) -> str:
        char = self.peek()
        if char == "":
            raise self.fail("expected a value")
        if char == '"' or (regexp and char in _QUOTES):
            return self.quoted()
        match = re.compile(r"[^\s,]+").match(self.text, self.offset)
        assert match is not None
        self.offset = match.end()
        return match.group()


def parse_filter(text: str) -> Filter:
    """One filter string -> its selectors (all must match). "" matches everything."""
    if text == "":
        return ()
    scanner = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [scanner.field()]
        while scanner.peek() == ".":
            scanner.offset += 1
            path.append(scanner.field())
        if scanner.peek() in ("", ","):
            selectors.append(Selector(tuple(path), "", ""))
        else:
            op = scanner.operator()
            value = scanner.value(regexp=op == "~=")
            if op == "~=":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise scanner.fail(f"bad regular expression {value!r} ({exc})") from exc
            selectors.append(Selector(tuple(path), op, value))
        char = scanner.peek()
        if char == "":
            return tuple(selectors)
        if char != ",":
            raise scanner.fail(f"unexpected input {char!r}")
        scanner.offset += 1


def parse_filters(texts: Iterable[str]) -> tuple[Filter, ...]:
    """Several filter strings: a snapshot matches when any one matches (none: all match)."""
    return tuple(parse_filter(text) for text in texts)


def snapshot_fields(*, name: str, parent: str, kind: str,
                    labels: Mapping[str, str]) -> Field:
    """The fields a snapshot offers to filters, as containerd's adaptSnapshot."""

    def field(path: tuple[str, ...]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "kind":
            return kind, True
        if path[0] == "name":
            return name, True
        if path[0] == "parent":
            return parent, True
        if path[0] == "labels":
            if not labels:
                return "", False
            key = ".".join(path[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return field


def matches(filters: tuple[Filter, ...], field: Field) -> bool:
    if not filters:
        return True
    return any(all(sel.match(field) for sel in selectors) for selectors in filters)
