"""Shaping reply text so avr-core speaks every word of it.

avr-core 1.4.1 takes every match of /[^.!?]*[.!?]/ from its per-call buffer as one sentence and
drops an unterminated tail (reply-framing.json, `stream-sentences`). So we cut the text ourselves,
one sentence per chunk, each ending in `.`, `!` or `?`, with no dot that would cut a number apart.
"""

from __future__ import annotations

import re
import unicodedata

# avr-core's sentence rule, verbatim (WIRE.md section 1).
SENTENCE = re.compile(r"[^.!?]*[.!?]")
_BRACKETED = re.compile(r"【[^】]*】")
# Every pattern here runs in linear time: answers come from outside and can be long and hostile.
_LINK = re.compile(r"\[([^\[\]]*)\]\([^()\s]*\)")
_MARKUP = re.compile(r"[*#`~_|>]+")
_BULLET = re.compile(r"^\s*(?:[-+•◦▪]\s+|(\d{1,3})[.)]\s+)")
_THOUSANDS = re.compile(r"(?<=\d)\.(?=\d{3}(?!\d))")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_ELLIPSIS = re.compile(r" ?(?:\.{2,}|…)+ ?")
_REPEATED = re.compile(r"([.!?])[.!?]+")
_SPACE_BEFORE_MARK = re.compile(r" ([.!?,;:])")
_END = re.compile(r"[.!?]")
MAX_REPLY_CHARS = 10_000
# Small chunks: a big one may reach avr-core in two socket reads, and half an object hangs up the call.
MAX_SENTENCE_CHARS = 250
_LINE_END = (".", "!", "?", ":", ";", ",")
# Emoji, pictographs, private-use and other symbols avr-core would drop anyway; currency and math stay.
_DROPPED_CATEGORIES = frozenset({"So", "Sk", "Cs", "Co", "Cn", "Cc", "Cf", "Me"})


def _dropped(ch: str) -> bool:
    return unicodedata.category(ch) in _DROPPED_CATEGORIES or 0xFE00 <= ord(ch) <= 0xFE0F


# str.translate tables are cached per character: one category look-up per distinct character, not per
# character of every answer (the profile showed that look-up as the turn path's largest Python cost).
_DROP_TABLE: dict[int, str | None] = {}
_ASCII_DROP = str.maketrans({code: None for code in range(128) if _dropped(chr(code))})


def drop_symbols(text: str) -> str:
    """Remove what avr-core's own cleaner drops: emoji, pictographs and other symbols."""
    if text.isascii():
        return text.translate(_ASCII_DROP)
    for ch in set(text):
        if ord(ch) in _DROP_TABLE:
            continue
        if len(_DROP_TABLE) < 65_536:
            _DROP_TABLE[ord(ch)] = None if _dropped(ch) else ch
        elif _dropped(ch):
            text = text.replace(ch, "")
    return text.translate(_DROP_TABLE)


# Text made only of these (space, printable ASCII and Latin-1 that is kept, minus the markup signs) on
# one line, with none of the patterns below, comes out of `clean` with only its spacing and closing
# mark changed: Spanish and English answers mostly look like this, and one search is all they cost.
_PLAIN_CHARS = "".join(
    chr(code) for code in range(0x20, 0x100)
    if (code == 0x20 or not chr(code).isspace()) and not _dropped(chr(code)) and chr(code) not in "*#`~_|>[]"
)
_SHAPED = re.compile(rf"[^{re.escape(_PLAIN_CHARS)}]|\d\.\d|[.!?][.!?]| [.!?,;:]|^ *(?:[-+]|\d+[.)])")


def _closed(line: str) -> str:
    """A line without closing punctuation gets a full stop."""
    return line if line.endswith(_LINE_END) else line + "."


def _unmark_line(line: str) -> str:
    line = " ".join(line.split())
    line = _BULLET.sub(lambda m: f"{m.group(1)}, " if m.group(1) else "", line)
    return _MARKUP.sub("", _LINK.sub(r"\1", line)).strip()


def _join_lines(text: str) -> str:
    """A line break ends a thought: a line without closing punctuation gets a full stop."""
    lines = [_unmark_line(line) for line in text.splitlines()]
    return " ".join(_closed(line) for line in lines if line)


def _ellipsis(match: re.Match[str]) -> str:
    rest = match.string[match.end():]
    return ". " if not rest or rest[0].isupper() or rest[0] in "¿¡" else ", "


def clean(text: str) -> str:
    """The reply as one line of speakable text, before it is cut into sentences."""
    text = text[:MAX_REPLY_CHARS]
    if _SHAPED.search(text) is None:
        line = " ".join(text.split())
        return _closed(line) if line else ""
    return _shape(text)


def _shape(text: str) -> str:
    """`clean` for text with markup, several lines, numbers, ellipses or symbols: every rule in turn."""
    text = unicodedata.normalize("NFC", text)
    text = drop_symbols(_join_lines(_BRACKETED.sub("", text)))
    text = _THOUSANDS.sub("", text)
    text = _DECIMAL.sub(",", text)
    text = _ELLIPSIS.sub(_ellipsis, text)
    text = _REPEATED.sub(r"\1", text)
    return _SPACE_BEFORE_MARK.sub(r"\1", " ".join(text.split()))


def _speakable(sentence: str) -> bool:
    return any(ch.isalnum() for ch in sentence)


def _split_long(sentence: str) -> list[str]:
    """Cut a sentence over MAX_SENTENCE_CHARS at a comma, else a space; each piece ends in a full stop."""
    pieces = []
    while len(sentence) > MAX_SENTENCE_CHARS:
        window = sentence[:MAX_SENTENCE_CHARS]
        cut = max(window.rfind(", "), window.rfind("; "))
        cut = cut + 1 if cut > MAX_SENTENCE_CHARS // 3 else window.rfind(" ")
        cut = cut if cut > 0 else MAX_SENTENCE_CHARS
        pieces.append(sentence[:cut].rstrip(",;: ") + ".")
        sentence = sentence[cut:].lstrip()
    return [*pieces, sentence]


def sentences(text: str) -> list[str]:
    """Every sentence of `text`, each one avr-core match long and ending in `.`, `!` or `?`."""
    cleaned = clean(text)
    found, start = [], 0
    for end in _END.finditer(cleaned):
        found.append(cleaned[start:end.end()].strip())
        start = end.end()
    tail = cleaned[start:].strip().rstrip(",;: ")
    if tail:
        found.append(tail + ".")
    return [piece for sentence in found if _speakable(sentence) for piece in _split_long(sentence)]


class SentenceStream:
    """Sentences out of an answer that arrives in pieces, each one as soon as it is complete.

    A `.`, `!` or `?` ends a sentence only once the next character is known to be a space (so `3.`
    followed by `5` stays a decimal); a line break ends one too. The same shaping as `sentences`.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._taken = 0

    def feed(self, piece: str) -> list[str]:
        room = MAX_REPLY_CHARS - self._taken - len(self._buffer)
        self._buffer += piece[:max(room, 0)]
        cut = _last_boundary(self._buffer)
        if cut < 0 and len(self._buffer) > 2 * MAX_SENTENCE_CHARS:
            cut = self._buffer.rfind(" ", 0, len(self._buffer) - 1)
        if cut < 0:
            return []
        ready, self._buffer = self._buffer[:cut + 1], self._buffer[cut + 1:]
        self._taken += len(ready)
        return sentences(ready)

    def end(self) -> list[str]:
        """The rest, whatever its punctuation: the answer is complete."""
        rest, self._buffer = self._buffer, ""
        return sentences(rest)


_BOUNDARY = re.compile(r"(?<!\.)[.!?](?=\s)|\n")


def _last_boundary(text: str) -> int:
    last = -1
    for match in _BOUNDARY.finditer(text):
        last = match.start()
    return last
