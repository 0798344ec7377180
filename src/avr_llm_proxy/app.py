"""create_app(settings): the routes and the lifespan that starts and stops what they use. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from .access import LOOPBACK, bearer, client_in, token_matches
from .breaker import CircuitBreaker
from .calls import CallRegistry
from .capture.agi import FastAgiServer
from .capture.ami import AmiListener
from .capture.files import LegacyCallerFiles
from .capture.routes import ClientGone, capture_router, read_body
from .config import Settings
from .console.feed import ConsoleFeed
from .console.routes import console_router
from .console.trial import TrialCalls
from .control import CallControl
from .demo_api import DemoApi
from .leader import HostLock, lead
from .lifecycle import Lifecycle
from .lookup import Lookup
from .manager import ManagerClient, parse_ami_url
from .observability import metrics_text
from .openai_chat import ChatUpstream, tools
from .privacy import Keys, number_redactor, resolve_keys
from .stores import open_store
from .turns import Speak, TurnPolicy, Turns
from .upstream import Deadlines, HttpUpstream, Upstream

log = structlog.get_logger("avr_llm_proxy.app")

MAINTENANCE_INTERVAL_S = 60.0


def choose_upstream(settings: Settings) -> Upstream:
    """UPSTREAM=openai, else the business API at API_URL, else the built-in demo."""
    deadlines = Deadlines(
        connect=settings.api_connect_timeout_ms / 1000,
        first_byte=min(settings.api_first_byte_timeout_ms, settings.api_timeout_ms) / 1000,
        total=settings.api_timeout_ms / 1000,
    )
    if settings.upstream == "openai":
        breaker = CircuitBreaker("openai", settings.breaker_failures, settings.breaker_cooldown_ms / 1000)
        return ChatUpstream(settings.openai_base_url, settings.openai_api_key, settings.openai_model,
                            settings.system_prompt, deadlines, breaker,
                            tools(settings.transfer_allow) if settings.call_control == "on" else None)
    if settings.api_url:
        breaker = CircuitBreaker("api", settings.breaker_failures, settings.breaker_cooldown_ms / 1000)
        return HttpUpstream(settings.api_url, deadlines, breaker, settings.api_token, settings.api_signing_secret)
    return DemoApi()


def keys_for(settings: Settings) -> Keys:
    """The sealer and hash key: ENCRYPTION_KEY, else a key file beside the SQLite database."""
    key_dir = Path(settings.sqlite_path).resolve().parent if settings.sqlite_path else None
    return resolve_keys(settings.encryption_key, settings.hash_key, key_dir)


def create_app(settings: Settings, keys: Keys | None = None) -> ASGIApp:
    """The HTTP service for one process, built from `settings` (and its keys) and nothing else."""
    keys = keys or keys_for(settings)
    store = open_store(settings.store_url, settings.store_timeout_ms / 1000)
    files = LegacyCallerFiles(settings.callerid_dir, settings.caller_ttl_seconds, settings.default_region,
                              settings.file_owners) if settings.callerid_dir else None
    registry = CallRegistry(store, settings.caller_ttl_seconds, [files.find] if files else [], keys.sealer,
                            keys.hash_key, keys.older_hash_keys)
    upstream = choose_upstream(settings)
    lookup = Lookup(registry, settings.lookup_url, settings.lookup_timeout_ms / 1000, settings.number_format,
                    settings.api_token, settings.api_signing_secret) if settings.lookup_url else None
    lifecycle = Lifecycle(registry, settings.default_region, settings.number_format, settings.events_url,
                          token=settings.api_token, signing_secret=settings.api_signing_secret)
    # Actions go on a manager connection of each process's own: any worker may answer the turn that asks.
    control = CallControl(registry, ManagerClient(parse_ami_url(settings.ami_url)) if settings.ami_url else None,
                          settings.destinations, settings.transfer_context, settings.action_delay_ms,
                          settings.speech_chars_per_second, lifecycle)
    turns = Turns(
        registry,
        upstream,
        TurnPolicy(
            bot_phone=settings.bot_phone, bot_phones=settings.bot_phones, number_format=settings.number_format,
            region=settings.default_region, caller_wait_s=settings.caller_wait_ms / 1000,
            fallback_message=settings.fallback_message, filler_after_s=settings.filler_after_ms / 1000,
            filler_message=settings.filler_message, keep_stale_turns=settings.keep_stale_turns,
            history_s=settings.history_days * 86400, timeline=settings.console == "on",
        ),
        lookup,
        control,
    )
    agi = FastAgiServer(registry, settings.agi_listen, settings.default_region) if settings.agi_listen else None
    ami = (AmiListener(registry, settings.ami_url, settings.default_region, hung_up=lifecycle.hung_up)
           if settings.ami_url else None)
    # With --workers N, one worker of the host holds the AMI connection (see leader.py).
    ami_lock = HostLock("ami", f"{settings.ami_url}|{settings.store_url}")
    redact = number_redactor(settings.log_numbers, keys.hash_key)

    async def maintain() -> None:
        """Expiry and file sweeping run here, never on a turn's path."""
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            try:
                purged = await registry.purge_expired()
                swept = await asyncio.to_thread(files.sweep) if files else 0
                if purged:
                    log.info("records_expired", count=purged, files=swept)
            except Exception:
                log.exception("maintenance_failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upstream.start()
        if lookup:
            await lookup.start()
        registry.start()
        await lifecycle.start()
        if agi:
            await agi.start()
        ami_duty = asyncio.create_task(lead(ami_lock, ami.start)) if ami else None
        if files:
            await asyncio.to_thread(files.sweep)
        task = asyncio.create_task(maintain())
        # What start-up loaded (phone number metadata, the framework, settings) lives as long as the
        # process: out of the collector's sight, a full collection takes ~0 ms instead of ~30 ms.
        gc.collect()
        gc.freeze()
        log.info(
            "proxy_ready", upstream=upstream.name, store=settings.store_url.split(":", 1)[0],
            caller_dir=settings.callerid_dir or "off", agi=f"{agi.host}:{agi.port}" if agi else "off",
            ami=f"{ami.endpoint.host}:{ami.endpoint.port}" if ami else "off",
        )
        if not (agi or ami or files):
            # What is left is POST /call: from the dialplan's CURL() (with pres=) or from avr-core.
            log.warning("presentation_not_captured", reason="AGI_LISTEN, AMI_URL and CALLERID_DIR are off, and "
                        "avr-core's call_initiated carries no presentation: a withheld caller is honoured only "
                        "when the dialplan posts /call itself (dialplan/avr-callerid-curl.conf)",
                        hint="set AGI_LISTEN or AMI_URL, or use avr-callerid-curl.conf")
        if (settings.transfer_allow or settings.call_control == "on") and not settings.ami_url:
            log.warning("call_control_off", reason="AMI_URL is not set: answers' transfer and hangup actions are "
                        "refused (action_refused reason=no_ami_url)",
                        hint="set AMI_URL to a manager user with write = call")
        try:
            yield
        finally:
            gc.unfreeze()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if agi:
                await agi.close()
            if ami_duty:
                ami_duty.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ami_duty
            if ami:
                await ami.close()
            ami_lock.release()
            await lifecycle.close()
            await turns.close()
            await control.close()
            if lookup:
                await lookup.close()
            await upstream.close()
            await store.close()

    app = FastAPI(title="avr-llm-proxy", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.include_router(capture_router(registry, settings.default_region, settings.networks, settings.capture_token,
                                      lifecycle, settings.webhook_secret))

    console = ConsoleFeed(registry, redact, upstream.breaker.describe)
    if settings.console == "on":
        trials = TrialCalls(registry, turns.request, console.spoken, settings.capture_token)
        app.include_router(console_router(console, settings.debug_token, keys.hash_key, trials))

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="The store answers; AMI state as detail (turns work without it)")
    async def readyz() -> Response:
        problem = await registry.ready()
        detail = {"store": problem or "ok", "upstream": upstream.name, "circuit": upstream.breaker.describe(),
                  "ami": "off" if ami is None else "connected" if ami.connected
                  else "disconnected" if ami_lock.held else "standby"}
        if problem:
            return JSONResponse({"status": "not_ready", **detail}, status_code=503)
        return JSONResponse({"status": "ready", **detail})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug", summary="The newest calls of the store (every worker's), numbers masked")
    async def debug(request: Request) -> Response:
        if settings.debug_token:
            if not token_matches(bearer(request.headers.get("authorization")), settings.debug_token):
                log.warning("debug_refused", reason="bad_token")
                return JSONResponse({"error": "a valid DEBUG_TOKEN bearer token is required"}, status_code=401)
        elif not client_in(request.client.host if request.client else None, LOOPBACK):
            log.warning("debug_refused", reason="not_loopback")
            return JSONResponse({"error": "set DEBUG_TOKEN to use /debug from another host"}, status_code=403)
        calls = [{"uuid": row["uuid"], "caller_number": row["number"], "presentation": row["presentation"],
                  "source": row["source"], "turns": row["turns"], "status": row["status"],
                  "last_status": row["last_status"], "last_latency_ms": row["latency_ms"],
                  "last_turn_at": row["last_turn_at"], "action": row["action"]}
                 for row in await console.rows()]
        return JSONResponse({"upstream": {"name": upstream.name, "circuit": upstream.breaker.describe()},
                             "calls": calls})

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return PromptStreamRoute(app, turns, settings.max_body_bytes)


_TURN_SCHEMA = {
    "type": "object",
    "required": ["uuid", "message"],
    "properties": {
        "uuid": {"type": "string", "format": "uuid"},
        "message": {"type": "string"},
        "messages": {"type": "array", "items": {"type": "object", "properties": {
            "role": {"type": "string"}, "content": {"type": "string"}}}},
        "callerid": {"type": "string"}, "caller_number": {"type": "string"}, "from": {"type": "string"},
    },
}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus /prompt-stream, which is served in front of the framework."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema["paths"]["/prompt-stream"] = {"post": {
            "summary": "avr-core's LLM_URL: one turn, answered as one {type: text, content} object per HTTP chunk",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _TURN_SCHEMA}}},
            "responses": {"200": {"description": "chunked text frames; a bad request is answered with the "
                                                 "spoken fallback, never an HTTP error"}},
        }}
        app.openapi_schema = schema
    return app.openapi_schema


class PromptStreamRoute:
    """avr-core's `POST /prompt-stream`, served on raw ASGI in front of the framework.

    It is the one hot path: the profile showed FastAPI's routing, middleware and StreamingResponse
    costing more than the turn itself, and none of them is needed to stream frames.
    """

    def __init__(self, app: ASGIApp, turns: Turns, max_body: int) -> None:
        self.app = app
        self.turns = turns
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != "/prompt-stream" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            body = await read_body(receive, headers.get(b"content-length", b""), self.max_body)
        except ClientGone:
            return
        header_uuid = headers.get(b"x-uuid")
        await self.turns.handle(body, header_uuid.decode("latin-1") if header_uuid else None, _speaker(send))


_STREAM_HEADERS = [(b"content-type", b"application/json")]
# After a turn's last byte, this process sleeps this long before its bookkeeping (log line, metrics,
# turn count). The kernel often wakes the reader of that byte (avr-core) on this same CPU; working on
# would keep it waiting. Measured with bench/turns.py's paced calls: 0.3 ms less added latency.
YIELD_AFTER_ANSWER_S = 0.001


def _speaker(send: Send) -> Speak:
    """One frame per HTTP chunk, each sent the moment it exists (a streamed answer is heard early).

    The status line waits for the first frames, and the last frames carry the end of the response,
    so a whole answer leaves in the fewest writes; then the CPU goes to whoever reads it.
    """
    started = False

    async def speak(frames: Sequence[bytes], last: bool) -> None:
        nonlocal started
        if not started:
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
        final = len(frames) - 1 if last else -1
        for index, chunk in enumerate(frames):
            await send({"type": "http.response.body", "body": chunk, "more_body": index != final})
        if last:
            if not frames:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            await asyncio.sleep(YIELD_AFTER_ANSWER_S)

    return speak


def app_from_env() -> ASGIApp:
    """Factory for `serve --workers N`: each worker process builds its own app from the environment."""
    from .config import load_settings
    from .observability import configure_logging

    settings = load_settings()
    keys = keys_for(settings)
    configure_logging(settings.log_numbers, keys.hash_key, settings.log_level)
    return create_app(settings, keys)
