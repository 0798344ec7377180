"""One logging chain (numbers redacted before anything is rendered) and the Prometheus metrics."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from structlog.typing import EventDict, WrappedLogger

from .privacy import NumberPolicy, number_redactor, scrub_text

# Fields that hold a caller's number: redacted whole.
NUMBER_FIELDS = frozenset({"caller_number", "number", "callerid", "from_number", "num", "e164", "raw"})
# Fields that never hold one (identifiers, figures): left as they are. `event` is not one of them: a
# library's log message lands there.
SAFE_FIELDS = frozenset(
    {"uuid", "uniqueid", "linkedid", "level", "timestamp", "latency_ms", "status", "turn",
     "source", "reason", "presentation", "path", "port", "host", "store", "upstream", "elapsed_ms",
     "client", "agi", "ami", "outcome", "sentences", "waited_ms", "retry_in_s", "count", "files", "valid"}
)
_PLACEHOLDERS = frozenset({"anonymous", "unknown", "", None})

TURNS = Counter("avr_llm_proxy_turns", "Turns answered, by outcome", ["outcome"])
FALLBACKS = Counter("avr_llm_proxy_fallbacks", "Turns answered with the fallback message, by reason", ["reason"])
CAPTURES = Counter("avr_llm_proxy_captures", "Callers recorded, by capture source", ["source"])
REJECTED = Counter("avr_llm_proxy_rejected_requests", "Requests refused, by endpoint and reason",
                   ["endpoint", "reason"])
UPSTREAM_LATENCY = Histogram(
    "avr_llm_proxy_upstream_latency_seconds",
    "Time from sending a turn to the business API until its answer was read",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
CALLER_WAIT = Counter("avr_llm_proxy_caller_waits", "Turns that had to wait for a capture, by result", ["result"])
AGI_SESSIONS = Counter("avr_llm_proxy_agi_sessions", "FastAGI sessions, by outcome", ["outcome"])
AMI_EVENTS = Counter("avr_llm_proxy_ami_events", "AMI events read")
# With --workers, gauges are read across the live workers: `livemax` says whether any worker is in that
# state (one holds the AMI connection; breakers are per worker), `livesum` adds them up.
AMI_CONNECTED = Gauge("avr_llm_proxy_ami_connected", "1 while logged in to the Asterisk manager",
                      multiprocess_mode="livemax")
UPSTREAM_RETRIES = Counter("avr_llm_proxy_upstream_retries", "Requests to the API sent again, by cause", ["reason"])
BREAKER_STATE = Gauge("avr_llm_proxy_circuit_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
                      ["upstream"], multiprocess_mode="livemax")
FIRST_SENTENCE = Histogram(
    "avr_llm_proxy_first_sentence_seconds", "Time from a turn's arrival to its first sentence leaving",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
)
ACTIONS = Counter("avr_llm_proxy_actions", "Call actions asked for by answers, by type and outcome (sent, refused, "
                  "failed)", ["type", "outcome"])
EVENTS = Counter("avr_llm_proxy_call_events", "Call events applied (avr-core's webhook, AMI hang-ups), by type",
                 ["type"])
ACTIVE_TURNS = Gauge("avr_llm_proxy_active_turns", "Turns in progress", multiprocess_mode="livesum")


class LogThrottle:
    """At most one line per interval for an event any peer can repeat at will (a refused connection):
    `allow()` is None while quiet, else the fields to add to the line (how many were skipped)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._skipped = 0

    def allow(self) -> dict[str, int] | None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return None
        skipped, self._skipped, self._next = self._skipped, 0, now + self.interval_s
        return {"similar_skipped": skipped} if skipped else {}


# prometheus_client's switch to per-process metric files, read by every process that imports it.
SHARED_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


@contextlib.contextmanager
def metrics_shared_by_workers() -> Iterator[Path]:
    """For `serve --workers N`: the workers (started inside) write their metrics to files in one new
    private directory, so a scrape answered by any worker reports the whole service. Removed after.

    It is made in systemd's RuntimeDirectory when there is one (/run is never swept by age, while a
    cleaner of /tmp could remove a file a gauge still writes to), else in TMPDIR.
    """
    directory = Path(tempfile.mkdtemp(prefix="avr-llm-proxy-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY")))
    os.environ[SHARED_METRICS_ENV] = str(directory)
    try:
        yield directory
    finally:
        os.environ.pop(SHARED_METRICS_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def metrics_text() -> bytes:
    """The Prometheus exposition: this process's metrics, or every worker's when they share files."""
    directory = os.environ.get(SHARED_METRICS_ENV)
    if not directory:
        return generate_latest()
    _forget_dead_workers(directory)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def _forget_dead_workers(directory: str) -> None:
    """A worker that died (and was replaced) no longer counts in the live gauges; its counters stay."""
    for path in Path(directory).glob("gauge_live*.db"):
        match = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another worker's scrape got there first
                multiprocess.mark_process_dead(int(match.group(1)), directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, under another user


class RedactNumbers:
    """The processor that keeps caller numbers out of every rendered line, whatever the call site did."""

    def __init__(self, policy: NumberPolicy, hash_key: bytes) -> None:
        self._redact = number_redactor(policy, hash_key)
        self._full = policy == "full"

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        if self._full:
            return event_dict
        for key, value in event_dict.items():
            if key in SAFE_FIELDS or not isinstance(value, str):
                continue
            if key in NUMBER_FIELDS and value not in _PLACEHOLDERS:
                event_dict[key] = self._redact(value)
            else:
                event_dict[key] = scrub_text(value, self._redact)
        return event_dict


class Logfmt:
    """structlog's LogfmtRenderer(key_order=LEADING_KEYS, drop_missing=True, bool_as_flag=False), line for
    line, at a third of its cost: it checked every character of every key of every line (a turn's line
    took 17 us of its 37); a key is checked once here. A property test holds the two to the same output.
    """

    LEADING_KEYS = ("timestamp", "level", "event", "uuid")
    MAX_KNOWN_KEYS = 4096

    def __init__(self) -> None:
        self._keys: set[str] = set()  # keys known to hold no blank or control character

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        items: list[tuple[str, Any]] = []
        for key in self.LEADING_KEYS:
            value = event_dict.pop(key, None)
            if value is not None:
                items.append((key, value))
        items += event_dict.items()
        elements = []
        for key, value in items:
            if key not in self._keys:
                if any(c <= " " for c in key):
                    raise ValueError(f'Invalid key: "{key}"')
                if len(self._keys) < self.MAX_KNOWN_KEYS:
                    self._keys.add(key)
            if value is None:
                elements.append(f"{key}=")
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            quoted = " " in text or "=" in text or '"' in text
            if quoted and "\\" in text:
                text = text.replace("\\", "\\\\")
            text = text.replace('"', '\\"').replace("\n", "\\n")
            elements.append(f'{key}="{text}"' if quoted else f"{key}={text}")
        return " ".join(elements)


def logging_processors(policy: NumberPolicy, hash_key: bytes) -> list[Any]:
    """The chain up to (not including) the renderer; tests reuse it with capture_logs."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        RedactNumbers(policy, hash_key),
    ]


def configure_logging(policy: NumberPolicy, hash_key: bytes, level: str = "info") -> None:
    """Configure structlog once for the process; suppressed levels cost nothing.

    Lines from other libraries (uvicorn, aiohttp, asyncio) go through the same chain, so an exception
    they print is redacted too.
    """
    renderer = Logfmt()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *logging_processors(policy, hash_key)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[*logging_processors(policy, hash_key), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
