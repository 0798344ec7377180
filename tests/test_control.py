"""The rules of call control without sockets: which destinations TRANSFER_ALLOW lets through, how an
action is read and refused, how long the message is given, and where answers carry the action."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from avr_llm_proxy.answers import AnswerDecoder, AnswerError
from avr_llm_proxy.config import SettingsError, load_settings
from avr_llm_proxy.control import ActionRefused, CallAction, parse_action, speaking_time
from avr_llm_proxy.extensions import parse_destinations
from avr_llm_proxy.openai_chat import action_from_tools

ALLOW = parse_destinations("1001, 1002,_2XXX,_9[1-3]Z,_5N!,_7.,sales")


@pytest.mark.parametrize(("extension", "allowed"), [
    ("1001", True), ("1002", True), ("1003", False), ("10011", False), ("sales", True), ("Sales", False),
    ("2000", True), ("2999", True), ("299", False), ("29999", False),
    ("921", True), ("931", True), ("941", False), ("920", False),
    ("52", True), ("5299", True), ("51", False), ("5", False),
    ("71", True), ("7", False), ("7abc", True),
    ("1001\n", False), ("2000 ", False), ("_2XXX", False), ("", False), ("1001,1002", False),
])
def test_destinations(extension: str, allowed: bool) -> None:
    """Exact extensions, and patterns with X, Z, N, [ranges], `.` (one or more) and `!` (zero or more)."""
    assert ALLOW.allows(extension) is allowed


def test_empty_allow_list_refuses_everything() -> None:
    nothing = parse_destinations("")
    assert not nothing and not nothing.allows("1001")


@pytest.mark.parametrize("entry", ["10 01", "PJSIP/1001", "_2XX]", "_[9-0]", "1001|1002", "_2XXX(1)", "a" * 33])
def test_bad_allow_entries_are_named(entry: str) -> None:
    with pytest.raises(ValueError, match="neither|pattern"):
        parse_destinations(f"1001,{entry}")
    with pytest.raises(SettingsError, match="TRANSFER_ALLOW"):
        load_settings(transfer_allow=entry)


@given(st.text(max_size=40))
def test_no_destination_outside_the_safe_characters(text: str) -> None:
    """Whatever the answer says, only digits, letters, * # + ever pass, whatever the patterns allow."""
    if parse_destinations("_!,_.").allows(text):
        assert text and all(ch.isascii() and (ch.isalnum() or ch in "*#+") for ch in text)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"type": "transfer", "to": "1001", "reason": "billing"}, CallAction("transfer", "1001", "billing")),
    ({"type": "transfer", "to": 2001}, CallAction("transfer", "2001")),
    ({"type": "hangup", "reason": "done\r\n\x00"}, CallAction("hangup", reason="done")),
    ({"type": "hangup", "to": "PJSIP/evil", "reason": 5}, CallAction("hangup")),
    ({"type": "transfer", "to": "1001", "reason": "x" * 500}, CallAction("transfer", "1001", "x" * 128)),
])
def test_actions_read(raw: dict[str, Any], expected: CallAction) -> None:
    assert parse_action(raw, ALLOW) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "not_an_object"), ([], "not_an_object"), ("hangup", "not_an_object"),
    ({}, "unknown_type"), ({"type": "Transfer", "to": "1001"}, "unknown_type"), ({"type": "park"}, "unknown_type"),
    ({"type": "transfer"}, "invalid_destination"), ({"type": "transfer", "to": True}, "invalid_destination"),
    ({"type": "transfer", "to": "1001\n"}, "invalid_destination"),
    ({"type": "transfer", "to": "Local/1001@default"}, "invalid_destination"),
    ({"type": "transfer", "to": "3001"}, "destination_not_allowed"),
])
def test_actions_refused(raw: object, reason: str) -> None:
    with pytest.raises(ActionRefused) as refused:
        parse_action(raw, ALLOW)
    assert refused.value.reason == reason


def test_speaking_time() -> None:
    assert speaking_time(0, 14) == 0.5
    assert speaking_time(28, 14) == 2.5
    assert speaking_time(10_000, 14) == 15.0


@pytest.mark.parametrize(("content_type", "body", "texts"), [
    ("application/json", b'{"message": "Le paso.", "action": {"type": "hangup"}}', ["Le paso."]),
    ("application/json", b'{"action": {"type": "hangup"}}', [""]),
    ("application/x-ndjson", b'{"message": "Uno."}\n{"action": {"type": "hangup"}}\n{"action": 2}\n', ["Uno."]),
    ("text/event-stream", b'data: {"message": "Uno."}\n\ndata: {"action": {"type": "hangup"}}\n\n', ["Uno."]),
])
def test_answers_carry_the_first_action(content_type: str, body: bytes, texts: list[str]) -> None:
    decoder = AnswerDecoder(content_type)
    assert decoder.feed(body) + decoder.end() == texts
    assert decoder.action == {"type": "hangup"}


def test_answer_without_message_or_action_is_still_an_error() -> None:
    decoder = AnswerDecoder("application/json")
    decoder.feed(b'{"other": 1}')
    with pytest.raises(AnswerError, match="no_message_in_json"):
        decoder.end()


@pytest.mark.parametrize(("calls", "action"), [
    ((("transfer_call", '{"to": "1001", "reason": "ventas"}'),),
     {"type": "transfer", "to": "1001", "reason": "ventas"}),
    ((("lookup_order", "{}"), ("end_call", "")), {"type": "hangup", "reason": None}),
    ((("transfer_call", '{"to": "10'),), {"type": "transfer", "to": None}),
    ((("transfer_call", "[1001]"),), {"type": "transfer", "to": None}),
    ((("lookup_order", "{}"),), None),
    ((), None),
])
def test_tool_calls_become_actions(calls: tuple[tuple[str, str], ...], action: dict[str, Any] | None) -> None:
    """The first call-control tool call is the action; broken arguments give one control.py refuses."""
    assert action_from_tools(calls) == action
    if action is not None and action["type"] == "transfer" and action["to"] is None:
        with pytest.raises(ActionRefused, match="invalid_destination"):
            parse_action(action, ALLOW)


def test_tool_call_pieces_are_put_together() -> None:
    decoder = AnswerDecoder("text/event-stream")
    for piece in ('{"index": 0, "function": {"name": "transfer_", "arguments": "{\\"to\\""}}',
                  '{"index": 0, "function": {"name": "call", "arguments": ": \\"1001\\"}"}}',
                  '{"index": 1, "function": {"name": "end_call"}}', '{"index": "x", "function": {}}', '"junk"'):
        decoder.feed(b'data: {"choices": [{"delta": {"tool_calls": [' + piece.encode() + b']}}]}\n\n')
    assert decoder.tool_calls == {0: ["transfer_call", '{"to": "1001"}'], 1: ["end_call", ""]}
