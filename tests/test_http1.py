"""The keep-alive HTTP/1.1 client against real loopback servers that answer with scripted bytes."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from avr_llm_proxy.http1 import ConnectFailed, ConnectionLost, ConnectTimeout, Pool, ProtocolError, Target
from avr_llm_proxy.upstream import AnswerInfo, Deadlines, HttpClient

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"message\":\"a\"}"
# Answers one request per call of the script, given the request bytes: the bytes to write, and whether to
# close the connection after them; None closes it without a word.
Script = Callable[[bytes], bytes | tuple[bytes, bool] | None]


class _Server:
    """A raw TCP server: counts connections, reads each request whole and writes the script's bytes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                answer = self.script(request)
                if answer is None:
                    break
                data, close = answer if isinstance(answer, tuple) else (answer, False)
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(script: Script, context: ssl.SSLContext | None = None) -> AsyncIterator[tuple[_Server, int]]:
    server = _Server(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    """A pool with a 1 s connect deadline, closed after the test whatever happened."""
    each = Pool(1.0)
    yield each
    await each.close()


async def body_of(pool: Pool, url: str, body: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request(url, body, {"Content-Type": "application/json"})
    pieces = []
    while chunk := await response.read():
        pieces.append(chunk)
    response.release()
    return response.status, b"".join(pieces)


@pytest.mark.parametrize(("answer", "body", "connections"), [
    (OK, b'{"message":"a"}', 1),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", b"abcde", 1),
    ((b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhola", True), b"hola", 3),
], ids=["content-length", "chunked", "until-close"])
async def test_connection_reuse(pool: Pool, answer: bytes | tuple[bytes, bool], body: bytes, connections: int,
                                ) -> None:
    """Three requests read to their end: a Content-Length or chunked answer (read piece by piece) leaves
    one kept-alive connection; a body that ends with the connection needs a new one each time."""
    async with serving(lambda request: answer) as (server, port):
        for _ in range(3):
            assert await body_of(pool, f"http://127.0.0.1:{port}/api") == (200, body)
    assert server.connections == connections


async def test_request_bytes(pool: Pool) -> None:
    """One POST with Host, Content-Length, the given headers and the body, on a new connection."""
    async with serving(lambda request: OK) as (server, port):
        response = await pool.request(f"http://127.0.0.1:{port}/api?x=1", b'{"a":1}', {"X-Key": "v"})
        response.release()
    assert server.connections == 1
    assert server.requests[0] == (f"POST /api?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 7\r\n"
                                  "X-Key: v\r\n\r\n{\"a\":1}").encode()


async def test_interim_response_is_skipped(pool: Pool) -> None:
    """A 103 Early Hints before the answer is not mistaken for it."""
    async with serving(lambda request: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK) as (_, port):
        assert await body_of(pool, f"http://127.0.0.1:{port}/") == (200, b'{"message":"a"}')


async def test_headers_are_folded_to_lower_case(pool: Pool) -> None:
    """Repeated headers are joined; names are lower case."""
    answer = b"HTTP/1.1 429 Too Many\r\nRetry-After: 1\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 0\r\n\r\n"
    async with serving(lambda request: answer) as (_, port):
        response = await pool.request(f"http://127.0.0.1:{port}/", b"", {})
        assert (response.status, response.headers["retry-after"], response.headers["x-a"]) == (429, "1", "1, 2")
        response.release()


async def test_closed_before_answer_is_early(pool: Pool) -> None:
    """A server that closes without answering: ConnectionLost, marked early (safe to send again)."""
    async with serving(lambda request: None) as (_, port):
        with pytest.raises(ConnectionLost) as lost:
            await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})
        assert lost.value.early


async def test_cut_in_the_middle_of_the_body(pool: Pool) -> None:
    """A body cut short: the reader gets ConnectionLost, not a truncated answer."""
    async with serving(lambda request: (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", True)) as (_, port):
        response = await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})
        assert await response.read() == b"abc"
        with pytest.raises(ConnectionLost) as lost:
            await response.read()
        assert not lost.value.early
        response.release()


async def test_garbage_is_a_protocol_error(pool: Pool) -> None:
    """Bytes that are not HTTP: ProtocolError, and the connection is dropped."""
    async with serving(lambda request: b"<html>hello</html>\r\n\r\n") as (_, port):
        with pytest.raises(ProtocolError):
            await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})


async def test_endless_headers_are_cut(pool: Pool) -> None:
    """More than 64 KiB of response headers: ProtocolError instead of unbounded memory."""
    junk = b"HTTP/1.1 200 OK\r\n" + b"X-Junk: " + b"a" * 1000 + b"\r\n"
    async with serving(lambda request: junk * 100) as (_, port):
        with pytest.raises(ProtocolError):
            await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})


async def test_refused(pool: Pool) -> None:
    """Nothing listening: ConnectFailed carrying the ConnectionRefusedError."""
    async with serving(lambda request: OK) as (_, port):
        pass
    with pytest.raises(ConnectFailed) as failed:
        await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})
    assert isinstance(failed.value.cause, ConnectionRefusedError)


async def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops the handshake: ConnectTimeout after the connect deadline."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())  # the one queued connection; later SYNs are dropped
        pool = Pool(0.2)
        with pytest.raises(ConnectTimeout):
            await pool.request(f"http://127.0.0.1:{listener.getsockname()[1]}/", b"{}", {})
        await pool.close()


async def test_idle_connection_closed_by_server_is_not_reused(pool: Pool) -> None:
    """The server closed a kept-alive connection: the next request opens a new one."""
    answers = iter([OK, None, OK])
    async with serving(lambda request: next(answers)) as (server, port):
        assert (await body_of(pool, f"http://127.0.0.1:{port}/"))[0] == 200
        with pytest.raises(ConnectionLost):
            await body_of(pool, f"http://127.0.0.1:{port}/")
        assert (await body_of(pool, f"http://127.0.0.1:{port}/"))[0] == 200
    assert server.connections == 2


async def test_unread_response_closes_its_connection(pool: Pool) -> None:
    """A response released before its end is not handed to the next request."""
    async with serving(lambda request: OK) as (server, port):
        response = await pool.request(f"http://127.0.0.1:{port}/", b"{}", {})
        response.release()
        assert (await body_of(pool, f"http://127.0.0.1:{port}/"))[0] == 200
    assert server.connections == 2


async def test_limit_makes_requests_wait_for_a_connection() -> None:
    """With limit=1, a second concurrent request waits for the first connection to come back."""
    async with serving(lambda request: OK) as (server, port):
        pool = Pool(1.0, limit=1)
        results = await asyncio.gather(*(body_of(pool, f"http://127.0.0.1:{port}/") for _ in range(3)))
        await pool.close()
    assert [status for status, _ in results] == [200, 200, 200]


def test_target_parsing() -> None:
    """Default ports leave the Host header bare; IPv6 hosts are bracketed; only http(s) is accepted."""
    assert Target.parse("https://api.example.com/v1/turn?a=b").host_header == b"api.example.com"
    assert Target.parse("https://api.example.com/v1/turn?a=b").path == b"/v1/turn?a=b"
    assert Target.parse("http://[::1]:8080").host_header == b"[::1]:8080"
    assert Target.parse("http://h").path == b"/"
    with pytest.raises(ValueError):
        Target.parse("ftp://h/x")


def _certificate(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: the server's context and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_https(tmp_path: Path) -> None:
    """TLS with certificate checking; an untrusted certificate is refused."""
    server_context, client_context = _certificate(tmp_path)
    async with serving(lambda request: OK, server_context) as (server, port):
        pool = Pool(2.0, ssl_context=client_context)
        assert await body_of(pool, f"https://127.0.0.1:{port}/api") == (200, b'{"message":"a"}')
        assert await body_of(pool, f"https://127.0.0.1:{port}/api") == (200, b'{"message":"a"}')
        await pool.close()
        untrusting = Pool(2.0)
        with pytest.raises(ConnectFailed) as failed:
            await untrusting.request(f"https://127.0.0.1:{port}/api", b"{}", {})
        assert isinstance(failed.value.cause, ssl.SSLCertVerificationError)
        await untrusting.close()
    assert server.connections == 1  # both trusted requests on one connection; the refused handshake never got one


async def test_turns_share_one_connection_through_the_upstream_client() -> None:
    """HttpClient hands every answer it read whole back to the pool: one connection for many turns."""
    async with serving(lambda request: OK) as (server, port):
        client = HttpClient(Deadlines(1.0, 1.0, 1.0))
        await client.start()
        for _ in range(3):
            assert [piece async for piece in client.stream(f"http://127.0.0.1:{port}/", b"{}", AnswerInfo())] == ["a"]
        await client.close()
    assert server.connections == 1
