"""Property-based fuzzing of every parser: no input, however hostile, raises anything but its named error."""

from __future__ import annotations

import contextlib

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from avr_llm_proxy.answers import AnswerDecoder, AnswerError
from avr_llm_proxy.avr import AvrRequestError, parse_turn
from avr_llm_proxy.capture.call import CaptureError, parse_call, parse_form

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=25,
)
KEYS = st.sampled_from(["uuid", "message", "messages", "callerid", "caller_number", "from", "payload", "num",
                        "name", "pres", "dnid", "caller_name", "presentation", "called_number", "role", "content"])
BODIES = st.dictionaries(KEYS, JSON, max_size=8).map(orjson.dumps) | st.binary(max_size=500)


@settings(max_examples=300)
@given(BODIES, st.one_of(st.none(), st.text(max_size=40)))
def test_turn_bodies(body: bytes, header_uuid: str | None) -> None:
    """Any /prompt-stream body is a turn or an AvrRequestError with a reason."""
    try:
        turn = parse_turn(body, header_uuid)
    except AvrRequestError as exc:
        assert exc.reason
        return
    assert len(turn.uuid) == 36 and isinstance(turn.message, str) and turn.turn >= 1


@settings(max_examples=300)
@given(BODIES, st.sampled_from(["application/json", "application/x-www-form-urlencoded", "", "text/plain",
                                "application/json; charset=latin-1"]))
def test_call_bodies(body: bytes, content_type: str) -> None:
    """Any /call body is a record or a CaptureError with a 4xx status."""
    try:
        record = parse_call(content_type, body, "EC")
    except CaptureError as exc:
        assert 400 <= exc.status < 500 and exc.reason
        return
    assert len(record.uuid) == 36 and len(record.caller.caller_number("raw")) <= 32


@given(st.binary(max_size=800))
def test_forms(body: bytes) -> None:
    """Form decoding never raises and keeps its caps."""
    fields = parse_form(body)
    assert len(fields) <= 32 and all(len(value) <= 4096 for value in fields.values())


@given(st.lists(st.binary(max_size=200), max_size=8),
       st.sampled_from(["text/event-stream", "application/x-ndjson", "text/plain", "application/json", "",
                        "text/html", "application/octet-stream", "application/json; charset=x-nonesuch",
                        "text/plain; charset=utf-16", "text/plain; charset=base64",
                        "text/event-stream; charset=zlib", "application/x-ndjson; charset=rot13"]))
def test_answer_streams(chunks: list[bytes], content_type: str) -> None:
    """Any answer bytes, split anywhere, give text pieces or an AnswerError."""
    decoder = AnswerDecoder(content_type)
    with contextlib.suppress(AnswerError):
        pieces = [piece for chunk in chunks for piece in decoder.feed(chunk)] + decoder.end()
        assert all(isinstance(piece, str) for piece in pieces)
