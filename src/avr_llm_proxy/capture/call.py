"""`POST /call` bodies: our JSON, avr-core's own `/call` payload, and the form Asterisk's `CURL()` posts.

Pure parsing, no web framework: bytes and a content type in, a `CallRecord` or a `CaptureError` out.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, unquote_plus

from ..avr import canonical_uuid, json_object
from ..calls import CallRecord
from ..identity import dialled_number, parse_caller, parse_trust

MAX_FORM_FIELDS = 32
MAX_FIELD_CHARS = 4096
# avr-core's own /call body nests the caller under `payload` (WIRE.md section 2).
_JSON_FIELDS = {
    "number": ("caller_number", "callerid", "number", "num", "from"),
    "name": ("caller_name", "name"),
    "presentation": ("presentation", "pres"),
    "called": ("called_number", "dnid", "to", "exten"),
    # What the network asserted: JSON `verstat`, `attestation`, `verify_result`; the form `verstat`,
    # `attest`, `verify` (or a whole P-Asserted-Identity or From header holding `verstat=`).
    "verstat": ("verstat",),
    "attestation": ("attestation", "attest"),
    "verify_result": ("verify_result", "verify"),
}


class CaptureError(Exception):
    """A capture request we refuse; `reason` is the short code sent back and logged."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def parse_form(body: bytes) -> dict[str, str]:
    """`application/x-www-form-urlencoded` as `CURL()` sends it.

    `URIENCODE` turns `+` into `%2B` (curl-post.http), but a dialplan without it sends a bare `+`,
    which form decoding would turn into a space: the number field keeps a literal `+`.
    """
    fields: dict[str, str] = {}
    for part in body.decode("utf-8", errors="replace").split("&")[:MAX_FORM_FIELDS]:
        key, _, value = part.partition("=")
        name = unquote_plus(key).strip().lower()
        if name:
            decode = unquote if name in ("num", "caller_number", "callerid") else unquote_plus
            fields[name] = decode(value)[:MAX_FIELD_CHARS]
    return fields


def _first(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = data.get(key)
        if value not in (None, ""):
            return value
    return None


def _text(value: object, limit: int = 128) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = "".join(ch for ch in str(value) if ch.isprintable()).strip()[:limit]
    return text or None


def parse_call(content_type: str, body: bytes, region: str) -> CallRecord:
    """The record a `/call` request asks us to keep."""
    source = "http"
    if "json" in content_type or body.lstrip()[:1] == b"{":
        data = json_object(body, CaptureError)
        if isinstance(data.get("payload"), dict):
            source = "avr-core"
            data = {**data["payload"], "uuid": data.get("uuid")}
    elif "x-www-form-urlencoded" in content_type or not content_type:
        data = parse_form(body)
        source = "curl"
    else:
        raise CaptureError("unsupported_content_type", 415)
    if data.get("uuid") in (None, ""):
        raise CaptureError("missing_uuid")
    uuid = canonical_uuid(data.get("uuid"))
    if uuid is None:
        raise CaptureError("invalid_uuid")
    caller = parse_caller(
        _first(data, _JSON_FIELDS["number"]),
        _first(data, _JSON_FIELDS["name"]),
        _first(data, _JSON_FIELDS["presentation"]),
        source=source,
        region=region,
    )
    called = _first(data, _JSON_FIELDS["called"])
    trust = parse_trust(_first(data, _JSON_FIELDS["verstat"]), _first(data, _JSON_FIELDS["attestation"]),
                        _first(data, _JSON_FIELDS["verify_result"]))
    return CallRecord(
        uuid=uuid,
        caller=caller,
        trust=trust,
        called_number=dialled_number(called),
        channel=_text(data.get("channel")),
        uniqueid=_text(data.get("uniqueid"), 64),
    )
