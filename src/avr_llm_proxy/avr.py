"""avr-core's wire contract: the turn request it sends and the reply framing it survives.

Request: `{uuid, message, messages}` (llm-requests.jsonl), plus the seed's optional caller fields.
Reply: exactly one `{"type":"text","content":…}` object per HTTP chunk; anything else ends the call
(reply-framing.json).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .speech import SENTENCE, drop_symbols

MAX_MESSAGE_CHARS = 20_000
MAX_HISTORY_ITEMS = 80
MAX_HISTORY_CHARS = 4000
UUID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def canonical_uuid(value: object) -> str | None:
    """The lowercase hyphenated UUID, or None: the only form that may name a record or a file."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    lowered = value.lower()
    return lowered if UUID_PATTERN.match(lowered) else None


class AvrRequestError(Exception):
    """A turn body we cannot use; `reason` is a short code for logs and metrics."""

    def __init__(self, reason: str, uuid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.uuid = uuid


@dataclass(frozen=True, slots=True)
class AvrTurn:
    """One utterance of one call, as avr-core asked for an answer to it."""

    uuid: str
    message: str
    turn: int
    body_caller: str | None = None
    history: tuple[tuple[str, str], ...] = ()


def json_object(body: bytes, error: Callable[[str], Exception]) -> dict[str, Any]:
    """A JSON object body, or `error("malformed_json" | "body_not_object")` raised: every endpoint's first check."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise error("malformed_json") from None
    if not isinstance(data, dict):
        raise error("body_not_object")
    return data


def _body_caller(data: dict[str, object]) -> str | None:
    """The seed's optional caller fields, first present one wins; only scalars count."""
    for key in ("callerid", "caller_number", "from"):
        value = data.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip():
            return str(value)[:256]
    return None


def _conversation(messages: object) -> tuple[int, tuple[tuple[str, str], ...]]:
    """How many times the caller has spoken (its user entries, at least 1), and the conversation so far
    as (role, text) pairs: the user and assistant entries with text, the last ones. One pass."""
    if not isinstance(messages, list):
        return 1, ()
    spoken = 0
    pairs = []
    first_kept = len(messages) - MAX_HISTORY_ITEMS
    for index, item in enumerate(messages):
        role = item.get("role") if isinstance(item, dict) else None
        if role == "user":
            spoken += 1
        elif role != "assistant":
            continue
        content = item.get("content")
        if index >= first_kept and isinstance(content, str):
            pairs.append((role, content[:MAX_HISTORY_CHARS]))
    return max(1, spoken), tuple(pairs)


def parse_turn(body: bytes, header_uuid: str | None = None) -> AvrTurn:
    """Validate a `/prompt-stream` body; `header_uuid` is avr-core >= 1.5.5's `X-UUID`.

    Only `uuid` and `message` must be right; the history is used to count turns and an odd entry in
    it never costs the caller an answer.
    """
    data = json_object(body, AvrRequestError)
    given = data.get("uuid") if data.get("uuid") is not None else header_uuid
    if given is None or given == "":
        raise AvrRequestError("missing_uuid")
    uuid = canonical_uuid(given)
    if uuid is None:
        raise AvrRequestError("invalid_uuid")
    message = data.get("message")
    if message is None:
        raise AvrRequestError("missing_message", uuid)
    if not isinstance(message, str):
        raise AvrRequestError("invalid_message", uuid)
    if len(message) > MAX_MESSAGE_CHARS:
        raise AvrRequestError("message_too_long", uuid)
    turn, history = _conversation(data.get("messages"))
    return AvrTurn(uuid=uuid, message=message, turn=turn, body_caller=_body_caller(data), history=history)


def frame(sentence: str) -> bytes:
    """One reply chunk: a single text object that avr-core JSON-parses on its own."""
    return orjson.dumps({"type": "text", "content": sentence})


class FramingError(Exception):
    """A reply chunk avr-core 1.4.1 would not survive; `outcome` is what it did (reply-framing.json)."""

    def __init__(self, detail: str, outcome: str = "hangup") -> None:
        super().__init__(f"{outcome}: {detail}")
        self.detail = detail
        self.outcome = outcome


_AVR_MARKUP = re.compile(r"【[^】]*】|[*#]")


class ReplyReader:
    """Reads one reply the way avr-core 1.4.1 does: each chunk parsed alone, sentences cut from a buffer.

    Used by `simulate` and the tests to prove what a caller would hear.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.ignored: list[str] = []

    def chunk(self, data: bytes) -> list[str]:
        """The sentences avr-core would send to TTS after this HTTP chunk."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise FramingError(f"chunk is not exactly one JSON object: {data[:60]!r}") from None
        if not isinstance(message, dict):
            raise FramingError(f"chunk is not a JSON object: {data[:60]!r}")
        kind = message.get("type")
        if kind == "audio":
            raise FramingError("audio chunk", outcome="process_exit")
        if kind != "text":
            self.ignored.append(str(kind))
            return []
        content = message.get("content")
        if not isinstance(content, str):
            raise FramingError("text chunk without string content")
        self.buffer += content
        found = [match.group(0) for match in SENTENCE.finditer(self.buffer)]
        self.buffer = self.buffer[sum(len(sentence) for sentence in found):]
        return [self._clean(sentence) for sentence in found]

    def end(self) -> str:
        """What avr-core silently drops at the end of the reply: text with no final punctuation."""
        dropped, self.buffer = self.buffer.strip(), ""
        return dropped

    @staticmethod
    def _clean(sentence: str) -> str:
        return " ".join(drop_symbols(_AVR_MARKUP.sub("", sentence.replace("\n", " "))).split())
