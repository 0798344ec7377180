"""Which extensions a caller may be transferred to: `TRANSFER_ALLOW`, extensions and Asterisk patterns.

A destination comes from the business API or a language model, so it is checked twice: it must be a
plain extension (digits, letters, `*`, `#`, `+`, nothing AMI or the dialplan would read as syntax),
and it must equal an allowed extension or match an allowed pattern (`_2XXX`, `_1[0-4]XX`, `_9.`),
with the pattern letters Asterisk gives them: X any digit, Z 1-9, N 2-9, `[…]` one of, `.` one or
more characters, `!` zero or more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_EXTENSION_CHARS = 32
EXTENSION = re.compile(rf"[0-9A-Za-z*#+]{{1,{MAX_EXTENSION_CHARS}}}")  # fullmatch only: `$` lets "\n" by
_PATTERN = re.compile(r"_(?:[0-9A-Za-z*#+!.]|\[[0-9A-Za-z*#+-]+\])+")
_LETTERS = {"x": "[0-9]", "z": "[1-9]", "n": "[2-9]", ".": ".+", "!": ".*"}


def _regex(pattern: str) -> re.Pattern[str]:
    """An Asterisk extension pattern (`_` already dropped) as a regular expression, for `fullmatch`."""
    parts = re.findall(r"\[[^\]]+\]|.", pattern)
    out = []
    for part in parts:
        if part.startswith("["):
            out.append("[" + "".join("-" if ch == "-" else re.escape(ch) for ch in part[1:-1]) + "]")
        else:
            out.append(_LETTERS.get(part.lower(), re.escape(part)))
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class Destinations:
    """The parsed `TRANSFER_ALLOW`: exact extensions and compiled patterns; empty allows nothing."""

    exact: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)

    def allows(self, extension: str) -> bool:
        return bool(EXTENSION.fullmatch(extension)) and (
            extension in self.exact or any(pattern.fullmatch(extension) for pattern in self.patterns))


def parse_destinations(text: str) -> Destinations:
    """`1001,1002,_2XXX` (spaces ignored); raises ValueError naming the first entry that is neither."""
    exact: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        if EXTENSION.fullmatch(entry):
            exact.add(entry)
        elif _PATTERN.fullmatch(entry):
            try:
                patterns.append(_regex(entry[1:]))
            except re.error:  # a backwards range such as [9-0]
                raise ValueError(f"{entry[:40]!r} is not a pattern Asterisk would accept") from None
        else:
            raise ValueError(f"{entry[:40]!r} is neither an extension (digits, letters, * # +) nor a pattern "
                             "such as _2XXX")
    return Destinations(frozenset(exact), tuple(patterns))
