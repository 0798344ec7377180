"""avr.py: the request avr-core sends and the framing it survives."""

from __future__ import annotations

import json

import orjson
import pytest

from avr_llm_proxy.avr import AvrRequestError, FramingError, ReplyReader, canonical_uuid, frame, parse_turn

from .conftest import FIXTURES, avr_requests


@pytest.mark.parametrize("captured", avr_requests(), ids=lambda r: r["scenario"])
def test_every_fixture_body_parses(captured: dict[str, object]) -> None:
    """Every body the real avr-core 1.4.1 sent becomes a turn with its uuid, message and turn number."""
    body = json.loads(str(captured["body_raw"]))
    turn = parse_turn(str(captured["body_raw"]).encode())
    assert turn.uuid == body["uuid"] and turn.message == body["message"]
    assert turn.turn == sum(1 for m in body["messages"] if m["role"] == "user")
    assert turn.body_caller is None


def test_seed_body_fields_are_read() -> None:
    """The seed's callerid / caller_number / from travel with the turn, first one wins."""
    uuid = "cbb1cd1e-86d0-4af4-b938-ebd18537fffb"
    assert parse_turn(orjson.dumps({"uuid": uuid, "message": "x", "from": "0987654321"})).body_caller == "0987654321"
    assert parse_turn(orjson.dumps({"uuid": uuid, "message": "x", "caller_number": 987654321})).body_caller == (
        "987654321"
    )


def test_x_uuid_header_is_used_when_body_has_none() -> None:
    """avr-core >= 1.5.5 also sends X-UUID; the body's uuid wins when both exist."""
    turn = parse_turn(b'{"message": "1"}', "CBB1CD1E-86D0-4AF4-B938-EBD18537FFFB")
    assert turn.uuid == "cbb1cd1e-86d0-4af4-b938-ebd18537fffb" and turn.message == "1"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "malformed_json"),
        (b"[]", "body_not_object"),
        (b'{"message": "x"}', "missing_uuid"),
        (b'{"uuid": "../../etc/passwd", "message": "x"}', "invalid_uuid"),
        (b'{"uuid": "cbb1cd1e-86d0-4af4-b938-ebd18537fffb"}', "missing_message"),
        (b'{"uuid": 7, "message": "x"}', "invalid_uuid"),
    ],
)
def test_bad_bodies_have_named_reasons(body: bytes, reason: str) -> None:
    """Each unusable body names why, for the log line and the metric."""
    with pytest.raises(AvrRequestError) as caught:
        parse_turn(body)
    assert caught.value.reason == reason


def test_canonical_uuid_only() -> None:
    """Only the 36-character hex form is accepted, lower-cased."""
    assert canonical_uuid("CBB1CD1E-86D0-4AF4-B938-EBD18537FFFB") == "cbb1cd1e-86d0-4af4-b938-ebd18537fffb"
    for bad in ("cbb1cd1e86d04af4b938ebd18537fffb", "../cbb1cd1e-86d0-4af4-b938-ebd18537ff", None, 5,
                "cbb1cd1e-86d0-4af4-b938-ebd18537fffg"):
        assert canonical_uuid(bad) is None


def test_reply_reader_matches_observed_avr_core() -> None:
    """Fed the observed reply, the emulation cuts exactly what the real avr-core sent to TTS."""
    framing = json.loads((FIXTURES / "reply-framing.json").read_text(encoding="utf-8"))["sentence_splitting"]
    reader = ReplyReader()
    heard = reader.chunk(frame(framing["observed_input"]))
    assert heard == framing["observed_tts_requests"]
    assert reader.end() == "Gracias por llamar"


@pytest.mark.parametrize(
    "chunk",
    [b'{"type":"text","content":"a."}{"type":"text","content":"b."}', b'data: {"type":"text"}', b"hola",
     b'{"type":"text","con'],
)
def test_reply_reader_flags_what_hangs_up(chunk: bytes) -> None:
    """Glued objects, SSE, plain text and split objects end a real call: the reader says so."""
    with pytest.raises(FramingError) as caught:
        ReplyReader().chunk(chunk)
    assert caught.value.outcome == "hangup"


def test_reply_reader_audio_kills_avr_core() -> None:
    """An audio chunk made the real avr-core exit."""
    with pytest.raises(FramingError) as caught:
        ReplyReader().chunk(b'{"type":"audio","content":"AAAA"}')
    assert caught.value.outcome == "process_exit"


def test_frame_is_one_compact_object() -> None:
    """A frame is exactly the object avr-core expects, UTF-8, no newline."""
    assert frame("¿Algo más?") == '{"type":"text","content":"¿Algo más?"}'.encode()


@pytest.mark.parametrize(
    "extra",
    [{"messages": None}, {"messages": [{"role": "user", "content": ["a", "b"]}]}, {"callerid": 5.5},
     {"messages": [{"role": "assistant", "content": "x."}] * 6000}, {"messages": [1, "x", None]},
     {"callerid": {"nested": 1}}],
)
def test_odd_history_never_costs_an_answer(extra: dict[str, object]) -> None:
    """Only uuid and message must be right; a long or odd history or caller field still gives a turn."""
    body = orjson.dumps({"uuid": "cbb1cd1e-86d0-4af4-b938-ebd18537fffb", "message": "hola", **extra})
    turn = parse_turn(body)
    assert turn.message == "hola" and turn.turn >= 1
