"""The console's routes: pages and static files from the package, the live table as Server-Sent
Events, a call's timeline as JSON, and the login that turns DEBUG_TOKEN into a session cookie.

Who may look is /debug's rule: without DEBUG_TOKEN, loopback clients only; with it, a session from
the login form (a signed, HttpOnly, SameSite=Strict cookie that lasts 12 h) or the token as a bearer.
Every answer forbids framing, inline scripts and caching; caller data is never in a URL or a title.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs

import orjson
import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..access import (
    LOOPBACK,
    SESSION_S,
    bearer,
    client_in,
    csrf_token,
    session_cookie,
    session_valid,
    token_matches,
)
from ..avr import canonical_uuid
from ..simulate import proxy_url
from .feed import ConsoleFeed
from .trial import TrialCalls, TrialError, parse_trial

log = structlog.get_logger("avr_llm_proxy.console")

STATIC = Path(__file__).with_name("static")
COOKIE = "avrlp_console"
MAX_LOGIN_BYTES = 4096
MAX_TRIAL_BYTES = 16 * 1024
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8"}
ASSETS = frozenset(path.name for path in STATIC.iterdir() if path.suffix in (".css", ".js"))


def _file(name: str, status: int = 200, **extra: str) -> Response:
    path = STATIC / name
    return Response(path.read_bytes(), status_code=status, media_type=_TYPES[path.suffix], headers={**HEADERS, **extra})


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None past `limit` bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


def console_router(feed: ConsoleFeed, debug_token: str, csrf_key: bytes, trials: TrialCalls) -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)

    def csrf(request: Request) -> str:
        return csrf_token(csrf_key, request.cookies.get(COOKIE, "") if debug_token else "loopback")

    def allowed(request: Request) -> bool:
        if debug_token:
            return token_matches(bearer(request.headers.get("authorization")), debug_token) or session_valid(
                request.cookies.get(COOKIE), debug_token, time.time())
        return client_in(request.client.host if request.client else None, LOOPBACK)

    def refused(request: Request, data: bool = False) -> Response:
        """The login form for a page (data=False), a bare 401/403 for data; the reason logged."""
        log.warning("console_refused", reason="no_session" if debug_token else "not_loopback", path=request.url.path)
        if not debug_token:
            return Response("set DEBUG_TOKEN to use the console from another host\n", status_code=403,
                            media_type="text/plain", headers=HEADERS)
        return Response(status_code=401, headers=HEADERS) if data else _file("login.html", 401)

    @router.get("")
    async def index(request: Request) -> Response:
        return _file("index.html") if allowed(request) else refused(request)

    @router.post("/login")
    async def login(request: Request) -> Response:
        body = await _body(request, MAX_LOGIN_BYTES)
        if body is None:
            return Response(status_code=413, headers=HEADERS)
        given = parse_qs(body.decode("utf-8", errors="replace")).get("token", [""])[0]
        if not token_matches(given, debug_token):
            log.warning("console_login_failed", client=request.client.host if request.client else None)
            return _file("login.html", 401)
        answer = Response(status_code=303, headers={**HEADERS, "Location": "/console"})
        answer.set_cookie(COOKIE, session_cookie(debug_token, time.time()), max_age=SESSION_S, path="/console",
                          httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return answer

    @router.get("/events")
    async def events(request: Request) -> Response:
        if not allowed(request):
            return refused(request, data=True)
        return StreamingResponse(feed.events(), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    @router.get("/calls/{uuid}")
    async def call_page(request: Request, uuid: str) -> Response:
        if not allowed(request):
            return refused(request)
        return _file("call.html") if canonical_uuid(uuid) else Response(status_code=404, headers=HEADERS)

    @router.get("/api/calls/{uuid}")
    async def call_timeline(request: Request, uuid: str) -> Response:
        if not allowed(request):
            return refused(request, data=True)
        canonical = canonical_uuid(uuid)
        timeline = await feed.timeline(canonical) if canonical else None
        if timeline is None:
            return JSONResponse({"error": "no such call"}, status_code=404, headers=HEADERS)
        return JSONResponse(timeline, headers=HEADERS)

    @router.get("/api/latency")
    async def latency(request: Request) -> Response:
        if not allowed(request):
            return refused(request, data=True)
        return JSONResponse(await feed.latency(), headers=HEADERS)

    @router.get("/api/csrf")
    async def csrf_for_page(request: Request) -> Response:
        """The test-call form's token; a page of another origin cannot read it."""
        if not allowed(request):
            return refused(request, data=True)
        return JSONResponse({"token": csrf(request)}, headers=HEADERS)

    @router.post("/api/test-call")
    async def test_call(request: Request) -> Response:
        if not allowed(request):
            return refused(request, data=True)
        if not token_matches(request.headers.get("x-csrf-token"), csrf(request)):
            log.warning("console_refused", reason="csrf", path=request.url.path)
            return JSONResponse({"error": "missing or wrong X-CSRF-Token"}, status_code=403, headers=HEADERS)
        body = await _body(request, MAX_TRIAL_BYTES)
        if body is None:
            return JSONResponse({"error": "body too large"}, status_code=413, headers=HEADERS)
        try:
            call = parse_trial(orjson.loads(body))
        except (orjson.JSONDecodeError, TrialError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400, headers=HEADERS)
        host, port = request.scope.get("server") or ("127.0.0.1", 80)
        result = await trials.run(proxy_url(str(host), int(port)), call)
        log.info("console_test_call", uuid=result["uuid"], turns=len(result["turns"]))
        return JSONResponse(result, headers=HEADERS)

    @router.get("/static/{name}")
    async def asset(name: str) -> Response:
        # The page's own code and style, no data: served to the login form too.
        return _file(name) if name in ASSETS else Response(status_code=404, headers=HEADERS)

    return router
