"""The HTTP capture endpoint `POST /call`: where a dialplan's `CURL()` (or avr-core's payload) lands."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import Receive

from ..access import Network, bearer, client_in, token_matches
from ..calls import CallRegistry, NumberErased
from ..lifecycle import EventError, Lifecycle, parse_event
from ..observability import REJECTED
from ..stores import StoreError
from .call import CaptureError, parse_call

log = structlog.get_logger("avr_llm_proxy.capture")

MAX_CALL_BODY = 16 * 1024
MAX_EVENT_BODY = 64 * 1024


class ClientGone(Exception):
    """The client went away before its request body was complete."""


async def read_body(receive: Receive, declared: str | bytes, limit: int) -> bytes | None:
    """The request body off raw ASGI, or None once it passes `limit` (the rest is not read).

    `declared` is the Content-Length header; every endpoint, /prompt-stream included, reads this way.
    """
    if declared.isdigit() and int(declared) > limit:
        return None
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _body(request: Request, limit: int) -> bytes | None:
    return await read_body(request.receive, request.headers.get("content-length", ""), limit)


def capture_router(
    registry: CallRegistry, region: str, networks: Sequence[Network], capture_token: str, lifecycle: Lifecycle,
    webhook_secret: str,
) -> APIRouter:
    """`POST /call`: from TRUSTED_NETWORKS or with CAPTURE_TOKEN; only the token may replace a record."""
    router = APIRouter()

    @router.post("/call", summary="Record the caller of a call (JSON, avr-core's payload, or CURL() form)")
    async def call(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").lower()
        is_form = "json" not in content_type

        def refuse(reason: str, status: int) -> Response:
            REJECTED.labels(endpoint="call", reason=reason).inc()
            log.warning("capture_refused", reason=reason, status=status, client=_client(request))
            if is_form:
                return PlainTextResponse(f"ERROR {reason}", status_code=status)
            return JSONResponse({"error": reason}, status_code=status)

        given = bearer(request.headers.get("authorization"))
        with_token = token_matches(given, capture_token)
        if given is not None and not with_token:
            return refuse("bad_capture_token", 401)
        if not with_token and not client_in(_client(request), networks):
            return refuse("untrusted_client: add its network to TRUSTED_NETWORKS or send CAPTURE_TOKEN", 403)
        try:
            body = await _body(request, MAX_CALL_BODY)
        except ClientGone:
            return Response(status_code=400)
        if body is None:
            return refuse("body_too_large", 413)
        try:
            record = parse_call(content_type, body, region)
        except CaptureError as exc:
            return refuse(exc.reason, exc.status)
        try:
            stored = await registry.capture(record, trusted=with_token)
        except NumberErased as exc:
            log.warning("capture_not_stored", uuid=record.uuid, reason=str(exc))
            return refuse("number_erased", 409)
        except StoreError as exc:
            log.error("capture_not_stored", uuid=record.uuid, reason=str(exc))
            return refuse("store_unavailable", 503)
        if stored is None:
            # Someone else could otherwise attach a false number to a live call.
            return refuse("already_captured: replacing a caller needs CAPTURE_TOKEN", 403)
        caller = stored.caller
        log.info(
            "caller_captured", uuid=stored.uuid, source=caller.source, caller_number=caller.log_number,
            presentation=caller.presentation, valid=caller.valid,
        )
        if is_form:
            return PlainTextResponse("OK")
        return JSONResponse({"status": "ok", "uuid": stored.uuid, "presentation": caller.presentation})

    @router.post("/events", summary="avr-core's webhooks: call_initiated, call_started, call_ended, …")
    async def events(request: Request) -> Response:
        def refuse(reason: str, status: int) -> Response:
            REJECTED.labels(endpoint="events", reason=reason.split(":")[0]).inc()
            log.warning("event_refused", reason=reason, status=status, client=_client(request))
            return JSONResponse({"error": reason}, status_code=status)

        if webhook_secret:
            if not token_matches(request.headers.get("x-avr-webhook-secret"), webhook_secret):
                return refuse("bad_webhook_secret", 401)
        elif not client_in(_client(request), networks):
            return refuse("untrusted_client: add its network to TRUSTED_NETWORKS or set WEBHOOK_SECRET", 403)
        try:
            body = await _body(request, MAX_EVENT_BODY)
        except ClientGone:
            return Response(status_code=400)
        if body is None:
            return refuse("body_too_large", 413)
        try:
            event = parse_event(body)
        except EventError as exc:
            return refuse(exc.reason, 400)
        try:
            await lifecycle.apply(event)
        except StoreError as exc:
            log.error("event_not_stored", uuid=event.uuid, type=event.type, reason=str(exc))
            return refuse("store_unavailable", 503)
        return JSONResponse({"status": "ok"})

    return router


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
