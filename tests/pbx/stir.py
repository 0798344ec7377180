"""STIR/SHAKEN for the PBX tests: Asterisk's own verification of a signed Identity header, offline.

A throwaway certificate authority, which Asterisk is told to trust, signs an EC P-256 certificate
carrying the TNAuthList extension with a service provider code (ATIS-1000080); a loopback HTTP server
serves it as the PASSporT's `x5u`. `identity()` signs a SHAKEN PASSporT (RFC 8225, 8588) for a call
and returns the INVITE's `Date` and `Identity` headers. A rogue key signs the `bad_signature` case,
and an x5u with a query string, which res_stir_shaken's URL checks refuse, the `bad_url` case.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import http.server
import threading
import time
import uuid
from dataclasses import dataclass

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

PROFILE = "avr-verify"
TN_AUTH_LIST = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.26")
CA_FILE = "stir-ca.pem"


def stir_shaken_conf(folder: str) -> str:
    """stir_shaken.conf: verify against the tests' CA; the x5u server is on loopback over http, which the
    defaults refuse (https, ports 443/8443, and an ACL without 127.0.0.0/8). Path checks stay on."""
    return (
        f"[verification]\ntype = verification\nca_file = {folder}/etc/{CA_FILE}\ncert_cache_dir = {folder}/lib\n"
        "failure_action = continue\nrelax_x5u_port_scheme_restrictions = yes\n"
        "x5u_deny = 0.0.0.0/0.0.0.0\nx5u_permit = 127.0.0.1/255.255.255.255\n\n"
        f"[{PROFILE}]\ntype = profile\nendpoint_behavior = verify\n"
    )


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
                 issuer_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer is not None:
        # TNAuthorizationList ::= SEQUENCE { [0] EXPLICIT IA5String "<service provider code>" }
        code = b"\x16\x041234"
        builder = builder.add_extension(
            x509.UnrecognizedExtension(TN_AUTH_LIST, b"\x30\x08\xa0\x06" + code), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Stir:
    """The tests' STI certificate authority and x5u server; `identity` signs one call's PASSporT."""

    ca_pem: str
    key: ec.EllipticCurvePrivateKey
    rogue: ec.EllipticCurvePrivateKey
    server: http.server.ThreadingHTTPServer

    @property
    def x5u(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/sti.pem"

    def identity(self, case: str, orig: str, dest: str) -> tuple[str, str]:
        """`Date` and `Identity` headers for a call from `orig` to `dest` (numbers): `good`, `bad_signature`
        (signed by a key the certificate is not for) or `bad_url` (an x5u res_stir_shaken refuses)."""
        x5u = self.x5u + ("?v=1" if case == "bad_url" else "")
        header = {"alg": "ES256", "ppt": "shaken", "typ": "passport", "x5u": x5u}
        claims = {"attest": "A", "dest": {"tn": [dest.lstrip("+")]}, "iat": int(time.time()),
                  "orig": {"tn": orig.lstrip("+")}, "origid": str(uuid.uuid4())}
        signing_input = f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}"
        key = self.rogue if case == "bad_signature" else self.key
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        jwt = f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"  # JWS: raw r || s
        return (f"Date: {email.utils.formatdate(usegmt=True)}",
                f"Identity: {jwt};info=<{x5u}>;alg=ES256;ppt=shaken")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_stir() -> Stir:
    """Make the keys and certificates and serve the signing certificate on a free loopback port."""
    ca_key, key, rogue = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _certificate("avr-llm-proxy test STI-CA", ca_key, None, ca_key)
    leaf = _certificate("avr-llm-proxy test SHAKEN", key, ca.subject, ca_key)
    body = leaf.public_bytes(serialization.Encoding.PEM)

    class Certificate(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-pem-file")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's name)
            """Quiet: the tests read Asterisk's log, not this one."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Certificate)
    threading.Thread(target=server.serve_forever, name="x5u", daemon=True).start()
    return Stir(ca.public_bytes(serialization.Encoding.PEM).decode(), key, rogue, server)
