"""Every HTTP endpoint of the OpenAPI document, hammered with random and hostile requests: no 5xx, no hang."""

from __future__ import annotations

import asyncio
import random
import string
import uuid as uuidlib
from pathlib import Path
from typing import Any

import orjson

from avr_llm_proxy.simulate import hear, http_request

from ..conftest import make_settings, running_api, running_proxy

CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "", "multipart/form-data",
                 "application/json; charset=utf-16", "text/xml"]
HOSTILE_STRINGS = ["", "../../etc/passwd", "$(reboot)", "`id`", "a;b|c&&d", "\x00\x01\x02", "😀" * 50, "9" * 2048,
                   "+593987654321\r\nX-Injected: 1", "anonymous", "%2B593987654321", "<script>", "null", "{}",
                   str(uuidlib.UUID(int=0)), "CBB1CD1E-86D0-4AF4-B938-EBD18537FFFB"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False, 0, -1, 2**62, 3.5])
    if choice in (2, 3):
        return rng.choice(HOSTILE_STRINGS)
    if choice == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(40)))
    if choice == 5:
        return str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
    if choice == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {key: random_value(rng, depth + 1) for key in rng.sample(FIELDS, rng.randrange(len(FIELDS)))}


FIELDS = ["uuid", "message", "messages", "callerid", "caller_number", "from", "payload", "caller_name",
          "presentation", "called_number", "num", "name", "pres", "dnid", "type", "role", "content", "to"]


def random_body(rng: random.Random, schema_fields: list[str]) -> tuple[bytes, str]:
    kind = rng.randrange(4)
    content_type = rng.choice(CONTENT_TYPES)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(300))), content_type
    fields = {key: random_value(rng) for key in rng.sample(FIELDS + schema_fields, rng.randrange(6))}
    if kind == 1:
        return "&".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8", "replace"), content_type
    return orjson.dumps(fields), content_type


async def test_every_endpoint_survives_random_requests(tmp_path: Path) -> None:
    """200 random requests per operation: never a 5xx (/prompt-stream: always 200 with avr-safe frames)."""
    rng = random.Random(20261129)
    async with running_api() as api, running_proxy(make_settings(tmp_path, api_url=api.url, caller_wait_ms=0)) as proxy:
        document = orjson.loads(b"".join((await http_request(f"{proxy.url}/openapi.json", b"", method="GET")).chunks))
        operations = [(path, method.upper(), spec) for path, item in document["paths"].items()
                      for method, spec in item.items()]
        assert {path for path, _, _ in operations} >= {"/prompt-stream", "/call", "/debug", "/healthz", "/readyz",
                                                       "/metrics"}
        for path, method, spec in operations:
            schema = spec.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            schema_fields = list(schema.get("properties", {}))
            for _ in range(200):
                body, content_type = random_body(rng, schema_fields)
                headers = rng.choice([{}, {"Authorization": "Bearer " + rng.choice(HOSTILE_STRINGS)},
                                      {"X-UUID": rng.choice(HOSTILE_STRINGS)}, {"X-Forwarded-For": "8.8.8.8"}])
                # Header values stay valid HTTP (printable ASCII): the HTTP parser, not the app, refuses others.
                safe_headers = {k: "".join(ch for ch in v if " " <= ch <= "~") for k, v in headers.items()}
                reply = await asyncio.wait_for(
                    http_request(f"{proxy.url}{path}", body if method == "POST" else b"", content_type or "text/plain",
                                 method, headers=safe_headers), 15)
                assert reply.status < 500, (path, body[:80], reply.status)
                if path == "/prompt-stream":
                    assert reply.status == 200 and hear(reply, "").problems == [], body[:80]
        health = await http_request(f"{proxy.url}/healthz", b"", method="GET")
        assert health.status == 200
