"""Who may write caller data or read call details: trusted networks and bearer tokens.

Framework-free, so every endpoint (and its tests) decides the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; an unset expected token matches nothing."""
    return bool(expected) and given is not None and hmac.compare_digest(given.encode(), expected.encode())


def client_in(host: str | None, networks: Sequence[Network]) -> bool:
    """Whether the peer address is inside one of the networks (an IPv4-mapped IPv6 address counts as IPv4)."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


SESSION_S = 12 * 3600  # how long a console login lasts


def _session_key(token: str) -> bytes:
    """The console's session key, derived from DEBUG_TOKEN: changing the token ends every session."""
    return hmac.new(token.encode(), b"avr-llm-proxy console session", hashlib.sha256).digest()


def _signed(token: str, text: str) -> str:
    return hmac.new(_session_key(token), text.encode(), hashlib.sha256).hexdigest()


def session_cookie(token: str, now: float) -> str:
    """A console session: its expiry and a signature of it (nothing else, no caller data)."""
    expires = str(int(now + SESSION_S))
    return f"{expires}.{_signed(token, expires)}"


def session_valid(cookie: str | None, token: str, now: float) -> bool:
    if not cookie or not token:
        return False
    expires, _, signature = cookie.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(signature.encode(), _signed(token, expires).encode())


def csrf_token(key: bytes, session: str) -> str:
    """The token a console form must send back in a header: bound to the session (its cookie, or the
    loopback client without one) and to a key every worker shares, so any worker checks it."""
    return hmac.new(key, b"console csrf|" + session.encode(), hashlib.sha256).hexdigest()
