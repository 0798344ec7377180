"""capture/call.py: the three `/call` body shapes, from the real bytes."""

from __future__ import annotations

import orjson
import pytest

from avr_llm_proxy.capture.call import CaptureError, parse_call, parse_form

from ..conftest import FIXTURES

UUID = "4612dcbb-064e-4d3f-b752-0e2053645bfa"


def test_curl_fixture_body() -> None:
    """The body Asterisk's CURL() really posted gives the caller, `%2B` and `%20` decoded."""
    raw = (FIXTURES / "curl-post.http").read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    content_type = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-type"))
    record = parse_call(content_type.decode(), body, "EC")
    assert record.uuid == UUID and record.caller.source == "curl"
    assert record.caller.e164 == "+593987654321" and record.caller.name == "Juan Perez"


def test_bare_plus_in_form_survives() -> None:
    """A dialplan without URIENCODE sends a bare `+`; it stays a plus, not a space."""
    assert parse_form(b"num=+593987654321&name=Juan+Perez") == {"num": "+593987654321", "name": "Juan Perez"}


def test_form_with_presentation_and_dnid() -> None:
    """The reference CURL() line's pres and dnid fields are honoured."""
    body = f"uuid={UUID}&num=%2B593987654321&name=Juan&pres=prohib&dnid=5551000".encode()
    record = parse_call("application/x-www-form-urlencoded", body, "EC")
    assert record.caller.presentation == "withheld" and record.caller.raw is None and record.called_number == "5551000"


def test_avr_core_payload() -> None:
    """avr-core's own {uuid, payload:{from,to,uniqueid,channel}} is read as a capture."""
    body = orjson.dumps({"uuid": UUID.upper(), "payload": {"from": "2000", "to": "5001", "uniqueid": "1770758888.32",
                                                           "channel": "PJSIP/2000-00000013"}})
    record = parse_call("application/json", body, "EC")
    assert record.uuid == UUID and record.caller.source == "avr-core" and record.caller.raw == "2000"
    assert record.called_number == "5001" and record.uniqueid == "1770758888.32"
    assert record.channel == "PJSIP/2000-00000013"


def test_json_fields() -> None:
    """Our JSON names: caller_number, caller_name, presentation, called_number."""
    body = orjson.dumps({"uuid": UUID, "caller_number": "0987654321", "caller_name": "Juan Perez",
                         "presentation": "allowed_not_screened", "called_number": "5551000"})
    record = parse_call("application/json", body, "EC")
    assert record.caller.e164 == "+593987654321" and record.caller.source == "http"


@pytest.mark.parametrize(
    ("content_type", "body", "reason", "status"),
    [
        ("application/json", b"{", "malformed_json", 400),
        ("application/json", b"[1]", "body_not_object", 400),
        ("application/json", b'{"caller_number": "1"}', "missing_uuid", 400),
        ("application/json", b'{"uuid": "../../tmp/x", "caller_number": "1"}', "invalid_uuid", 400),
        ("application/x-www-form-urlencoded", b"uuid=abc&num=1", "invalid_uuid", 400),
        ("text/xml", b"<call/>", "unsupported_content_type", 415),
    ],
)
def test_refusals_name_their_reason(content_type: str, body: bytes, reason: str, status: int) -> None:
    """Every refusal carries a reason and the HTTP status to send."""
    with pytest.raises(CaptureError) as caught:
        parse_call(content_type, body, "EC")
    assert (caught.value.reason, caught.value.status) == (reason, status)


def test_avr_core_payload_cannot_replace_the_uuid() -> None:
    """A `uuid` inside avr-core's free-form payload never overrides the call's own."""
    body = orjson.dumps({"uuid": UUID, "payload": {"uuid": "cbb1cd1e-86d0-4af4-b938-ebd18537fffb", "from": "2000"}})
    assert parse_call("application/json", body, "EC").uuid == UUID
