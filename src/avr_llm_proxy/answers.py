"""Reading what a business API (or an LLM server) answers: whole, or streamed piece by piece.

Sans-I/O: `AnswerDecoder` is fed body bytes and returns the text pieces they complete. The shapes
are ARCHITECTURE.md's: `{"message": …}` (also `text`, `content`, `response`, `answer`, `reply`,
OpenAI-style `choices[0].message.content` or `choices[0].delta.content`), plain text, NDJSON lines,
SSE `data:` fields (comments, keep-alives and `[DONE]` ignored), or a chunked `text/plain` body.
A JSON answer, line or event may also hold an `action` (call control); the first one is kept, and
so are an OpenAI-style answer's `tool_calls`, put together from their streamed pieces.
"""

from __future__ import annotations

import codecs

import orjson

_REPLY_KEYS = ("message", "text", "content", "response", "answer", "reply")
MAX_LINE_BYTES = 64 * 1024
MAX_TOOL_CALLS, MAX_TOOL_CALL_CHARS = 4, 4096


class AnswerError(ValueError):
    """An answer we cannot read; the message is the reason code for logs and metrics."""


def text_from_json(data: object) -> str | None:
    """The text in one JSON answer or stream event, or None when it holds none."""
    if isinstance(data, str):
        return data
    if not isinstance(data, dict):
        return None
    for key in _REPLY_KEYS:
        value = data.get(key)
        if isinstance(value, str):
            return value
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        for key in ("delta", "message"):
            part = choices[0].get(key)
            if isinstance(part, dict) and isinstance(part.get("content"), str):
                return str(part["content"])
        if isinstance(choices[0].get("text"), str):
            return str(choices[0]["text"])
    return None


def _kind(content_type: str) -> str:
    declared = content_type.split(";", 1)[0].strip().lower()
    if declared == "text/event-stream":
        return "sse"
    if declared in ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"):
        return "ndjson"
    if "json" in declared:
        return "json"
    if "html" in declared:
        return "html"
    if declared.startswith("text/"):
        return "text"
    return "sniff"  # missing or generic (application/octet-stream): look at the whole body


def _charset(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip(' "'):
            return value.strip(' "')
    return "utf-8"


class AnswerDecoder:
    """Bytes of one answer in, text pieces out; `streaming` says whether pieces come before the end."""

    def __init__(self, content_type: str) -> None:
        self.kind = _kind(content_type)
        self.streaming = self.kind in ("sse", "ndjson", "text")
        self._charset = _charset(content_type)
        self._text: codecs.IncrementalDecoder | None = None
        if self.streaming:  # a whole answer is decoded once, at its end
            try:
                b"\0".decode(self._charset, errors="replace")  # refuses what is no text encoding (base64, rot13)
                self._text = codecs.getincrementaldecoder(self._charset)(errors="replace")
            except (LookupError, ValueError):
                self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._whole: list[bytes] = []
        self.action: object | None = None  # the answer's first `action`, for control.py to judge
        self.tool_calls: dict[int, list[str]] = {}  # index -> [function name, arguments JSON so far]
        self._line = ""
        self._event: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        if self._text is None:
            self._whole.append(data)
            return []
        text = self._decode(data)
        if self.kind == "text":
            return [text] if text else []
        self._line += text
        if len(self._line) > MAX_LINE_BYTES and "\n" not in self._line:
            raise AnswerError("stream_line_too_long")
        *lines, self._line = self._line.split("\n")
        return [piece for line in lines for piece in self._on_line(line.rstrip("\r"))]

    def end(self) -> list[str]:
        """What the end of the body completes; raises AnswerError for an unreadable whole answer."""
        if self._text is None:
            body = b"".join(self._whole)
            try:
                text = body.decode(self._charset, errors="replace")
            except LookupError:
                text = body.decode("utf-8", errors="replace")
            except UnicodeError:
                raise AnswerError("undecodable_answer") from None
            return [self._whole_answer(text)]
        text = self._decode(b"", final=True)
        if self.kind == "text":
            return [text] if text else []
        self._line += text
        pieces = self._on_line(self._line) if self._line else []
        return pieces + self._dispatch() if self.kind == "sse" else pieces

    def _decode(self, data: bytes, final: bool = False) -> str:
        assert self._text is not None
        try:
            return self._text.decode(data, final)
        except UnicodeError:  # errors="replace" does not cover all: UTF-16 without a byte-order mark
            raise AnswerError("undecodable_answer") from None

    def _whole_answer(self, text: str) -> str:
        sniffed = text.lstrip()[:15].lower()
        if self.kind == "json" or (self.kind == "sniff" and sniffed[:1] in ("{", "[", '"')):
            try:
                found = text_from_json(self._noted(orjson.loads(text)))
            except orjson.JSONDecodeError:
                raise AnswerError("invalid_json") from None
            if found is None and self.action is not None:
                return ""  # an action alone: nothing to say first
            if found is None:
                raise AnswerError("no_message_in_json")
            return found
        if self.kind == "html" or sniffed.startswith(("<!doctype", "<html")):
            raise AnswerError("html_answer")
        return text

    def _on_line(self, line: str) -> list[str]:
        if self.kind == "ndjson":
            return self._piece(line) if line.strip() else []
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return []  # SSE comment or keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._event.append(value[1:] if value.startswith(" ") else value)
        return []

    def _dispatch(self) -> list[str]:
        data, self._event = "\n".join(self._event), []
        return self._piece(data) if data else []

    def _noted(self, data: object) -> object:
        if not isinstance(data, dict):
            return data
        if self.action is None and data.get("action") is not None:
            self.action = data["action"]
        choices = data.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            for key in ("delta", "message"):
                part = choices[0].get(key)
                if isinstance(part, dict) and isinstance(part.get("tool_calls"), list):
                    self._tool_pieces(part["tool_calls"])
        return data

    def _tool_pieces(self, pieces: list[object]) -> None:
        """Add streamed tool-call pieces (`{"index", "function": {"name", "arguments"}}`) to the calls so far."""
        for position, piece in enumerate(pieces):
            if not isinstance(piece, dict) or not isinstance(piece.get("function"), dict):
                continue
            index = piece.get("index", position)
            if not isinstance(index, int) or (index not in self.tool_calls and len(self.tool_calls) >= MAX_TOOL_CALLS):
                continue
            call = self.tool_calls.setdefault(index, ["", ""])
            for slot, field in enumerate(("name", "arguments")):
                value = piece["function"].get(field)
                if isinstance(value, str) and len(call[slot]) + len(value) <= MAX_TOOL_CALL_CHARS:
                    call[slot] += value

    def _piece(self, data: str) -> list[str]:
        if data.strip() == "[DONE]":
            return []
        stripped = data.lstrip()
        if stripped[:1] in ("{", "[", '"'):
            try:
                found = text_from_json(self._noted(orjson.loads(stripped)))
            except orjson.JSONDecodeError:
                return [data]
            return [found] if found else []
        return [data]
