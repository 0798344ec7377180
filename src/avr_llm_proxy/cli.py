"""The `avr-llm-proxy` command: serve, simulate, check, calls, forget."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .config import Settings, SettingsError, load_settings, without_credentials

if TYPE_CHECKING:
    from .calls import CallRegistry

T = TypeVar("T")


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{key: value for key, value in overrides.items() if value is not None})
    except SettingsError as exc:
        print(f"avr-llm-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError("must be a number of processes >= 1, or auto")


def serve(args: argparse.Namespace) -> int:
    import structlog
    import uvicorn

    from .app import create_app, keys_for
    from .http_protocol import listener_options
    from .observability import configure_logging, metrics_shared_by_workers

    settings = _settings(host=args.host, port=args.port)
    if args.workers > 1 and settings.store_url == "memory://":
        print(
            "avr-llm-proxy: invalid setting STORE_URL (got 'memory://'): each worker would have its own "
            "memory; use sqlite:///<path> with --workers",
            file=sys.stderr,
        )
        return 2
    problem = asyncio.run(_store_problem(settings))
    if problem:
        print(f"avr-llm-proxy: invalid setting STORE_URL (got {without_credentials(settings.store_url)!r}): {problem}",
              file=sys.stderr)
        return 2
    try:
        keys = keys_for(settings)
    except OSError as exc:
        print(f"avr-llm-proxy: cannot create the encryption key file (set ENCRYPTION_KEY): {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_numbers, keys.hash_key, settings.log_level)
    log = structlog.get_logger("avr_llm_proxy.cli")
    if keys.created:
        log.warning("encryption_key_created", path=str(keys.created),
                    hint="back it up; replicas sharing a store need the same ENCRYPTION_KEY")
    if keys.note:
        log.warning("hash_key_ephemeral", reason=keys.note)
    _raise_fd_limit(log)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": "warning",
        "loop": "uvloop" if sys.platform != "win32" else "asyncio", **listener_options(),
    }
    if args.workers > 1:
        with metrics_shared_by_workers():
            uvicorn.run("avr_llm_proxy.app:app_from_env", factory=True, workers=args.workers, **options)
    else:
        uvicorn.run(create_app(settings, keys), **options)
    return 0


def _raise_fd_limit(log: Any) -> None:
    """Take the open-files hard limit as the soft one: every call holds sockets (AudioSocket turns, AGI,
    the business API), and a soft limit of 1,024 was reached by 1,100 held connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        log.warning("fd_limit_not_raised", soft=soft, hard=hard, reason=str(exc))
        return
    log.info("fd_limit_raised", soft=wanted, was=soft)


def simulate(args: argparse.Namespace) -> int:
    """Play one call against the proxy that `serve` runs on these same settings (HOST, PORT, CAPTURE_TOKEN)."""
    from .simulate import new_call_uuid, play_call, proxy_url, register_caller

    settings = _settings()
    base = (args.url or proxy_url(settings.host, settings.port)).rstrip("/")
    token = settings.capture_token or None
    call_uuid = args.uuid or new_call_uuid()

    async def run() -> int:
        failed = False
        print(f"call {call_uuid}")
        if args.register != "none":
            reply = await register_caller(base, call_uuid, args.caller, args.name, args.called, args.register,
                                          token)
            body = b"".join(reply.chunks).decode("utf-8", "replace").strip()
            print(f"  caller registered via /call ({args.register}): HTTP {reply.status} {body}")
            failed = not 200 <= reply.status < 300
        for heard in await play_call(base, call_uuid, list(args.utterances)):
            print(f"> {heard.said}")
            for sentence in heard.sentences:
                print(f"< {sentence}")
            for problem in heard.problems:
                print(f"! {problem}")
                failed = True
        return 1 if failed else 0

    try:
        return asyncio.run(run())
    except OSError as exc:
        print(f"avr-llm-proxy: cannot reach {base}: {exc}", file=sys.stderr)
        return 1


def _reachable(url: str, timeout: float = 2.0) -> str | None:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc)


async def _store_problem(settings: Settings) -> str | None:
    """Why the configured store cannot be used, or None."""
    from .stores import StoreError, open_store

    try:
        store = open_store(settings.store_url, settings.store_timeout_ms / 1000)
        try:
            await store.ping()
        finally:
            await store.close()
    except StoreError as exc:
        return str(exc)
    return None


def check(args: argparse.Namespace) -> int:
    settings = _settings()
    problems = 0

    def report(ok: bool, what: str, detail: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")

    report(True, "settings", f"HTTP {settings.host}:{settings.port}, store {settings.store_url.split(':')[0]}")

    problem = asyncio.run(_store_problem(settings))
    report(problem is None, "store", problem or without_credentials(settings.store_url))
    if settings.api_url:
        parts = urlsplit(settings.api_url)
        problem = _reachable(settings.api_url)
        report(problem is None, "business API reachable",
               problem or without_credentials(f"{parts.scheme}://{parts.netloc}"))
    else:
        report(True, "business API", "built-in demo API (set API_URL for yours)")
    if settings.callerid_dir:
        readable = os.path.isdir(settings.callerid_dir) and os.access(settings.callerid_dir, os.R_OK | os.X_OK)
        report(readable, "legacy caller files", settings.callerid_dir)
    return 1 if problems else 0


def _on_registry(settings: Settings, action: Callable[[CallRegistry], Awaitable[T]]) -> T | None:
    """Run one registry action against the configured store; None (reported) when the store fails."""
    from .app import keys_for
    from .calls import CallRegistry
    from .stores import StoreError, open_store

    async def run() -> T:
        store = open_store(settings.store_url, settings.store_timeout_ms / 1000)
        try:
            keys = keys_for(settings)
            return await action(CallRegistry(store, settings.caller_ttl_seconds, (), keys.sealer, keys.hash_key,
                                             keys.older_hash_keys))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreError as exc:
        print(f"avr-llm-proxy: {exc}", file=sys.stderr)
        return None


def forget(args: argparse.Namespace) -> int:
    """Erase every record of one number: the store (by its keyed hash) and legacy caller files."""
    from .capture.files import LegacyCallerFiles
    from .identity import parse_caller
    from .privacy import mask_number

    settings = _settings()
    caller = parse_caller(args.number, source="forget", region=args.region or settings.default_region)
    number = caller.e164 or caller.raw
    if caller.presentation != "allowed" or not number:
        print(f"avr-llm-proxy: {args.number!r} is not a phone number", file=sys.stderr)
        return 2
    if settings.store_url == "memory://":
        print("avr-llm-proxy: the memory store lives inside the serving process; restarting it erases every "
              "record", file=sys.stderr)
        return 1

    erased = _on_registry(settings, lambda registry: registry.forget_number(caller))
    if erased is None:
        return 1
    files = 0
    if settings.callerid_dir:
        files = LegacyCallerFiles(settings.callerid_dir, settings.caller_ttl_seconds, settings.default_region,
                                  settings.file_owners).erase_number(number)
    print(f"erased {erased} record(s) and {files} caller file(s) of {mask_number(number)} "
          f"from {settings.store_url.split(':')[0]}")
    return 0


def calls(args: argparse.Namespace) -> int:
    """The newest calls in the configured store, numbers masked."""
    import datetime

    from .app import keys_for
    from .control import describe
    from .privacy import number_redactor

    settings = _settings()
    if settings.store_url == "memory://":
        print("avr-llm-proxy: the memory store lives inside the serving process; see GET /debug", file=sys.stderr)
        return 1
    redact = number_redactor(settings.log_numbers, keys_for(settings).hash_key)
    records = _on_registry(settings, lambda registry: registry.newest(args.limit))
    if records is None:
        return 1

    def when(stamp: float | None) -> str:
        return datetime.datetime.fromtimestamp(stamp).strftime("%H:%M:%S") if stamp else "-"

    print(f"{'uuid':<36}  {'captured':<8}  {'caller':<16}  {'presentation':<11}  {'source':<8}  "
          f"{'called':<12}  {'started':<8}  {'ended':<8}  {'turns':>5}  action")
    for record, turns in records:
        caller = record.caller
        number = caller.shown(redact)
        print(f"{record.uuid:<36}  {when(record.captured_at):<8}  {number:<16}  {caller.presentation:<11}  "
              f"{caller.source:<8}  {record.called_number or '-':<12}  {when(record.started_at):<8}  "
              f"{when(record.ended_at):<8}  {turns:>5}  {describe(record.action)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avr-llm-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="run the HTTP service (settings from env and .env)")
    p_serve.add_argument("--host", help="overrides HOST")
    p_serve.add_argument("--port", type=int, help="overrides PORT")
    p_serve.add_argument("--workers", type=_workers, default=1, help="worker processes, or auto (one per core)")
    p_serve.set_defaults(func=serve)

    p_sim = sub.add_parser("simulate", help="play one call against a running proxy as avr-core would")
    p_sim.add_argument("--url", help="the proxy (default: http://HOST:PORT of the settings, as serve listens)")
    p_sim.add_argument("--caller", required=True, help="the caller's number, as Asterisk would give it")
    p_sim.add_argument("--name", help="the caller's name")
    p_sim.add_argument("--called", help="the number the caller dialled (DID)")
    p_sim.add_argument("--uuid", help="the call's UUID (default: a new one)")
    p_sim.add_argument("--register", choices=("json", "form", "none"), default="json",
                       help="how to record the caller first: /call JSON, the CURL() form, or not at all")
    p_sim.add_argument("utterances", nargs="+", help="what the caller says, one argument per turn")
    p_sim.set_defaults(func=simulate)

    p_check = sub.add_parser("check", help="validate settings and reachability")
    p_check.set_defaults(func=check)

    p_calls = sub.add_parser("calls", help="list the newest calls in the store (numbers masked)")
    p_calls.add_argument("--limit", type=int, default=50)
    p_calls.set_defaults(func=calls)

    p_forget = sub.add_parser("forget", help="erase every stored record of a phone number")
    p_forget.add_argument("number", help="the number, in any spelling (read in DEFAULT_REGION)")
    p_forget.add_argument("--region", help="read the number in this region instead of DEFAULT_REGION")
    p_forget.set_defaults(func=forget)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
