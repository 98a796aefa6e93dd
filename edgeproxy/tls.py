"""TLS termination: one SSLContext per certificate, chosen by SNI from referenced Secrets.

Secrets are kubernetes.io/tls (data tls.crt / tls.key, base64 PEM) named by served Ingresses'
spec.tls, looked up in the Ingress's namespace. Exact SNI name first, then a wildcard entry,
else the default certificate (--default-certificate, or self-signed at start). A changed Secret
gives a new context for new handshakes; established connections keep theirs.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable
from typing import Any

from edgeproxy.compile import TlsBinding
from edgeproxy.objects import Snapshot

log = logging.getLogger("edgeproxy.tls")

ALPN = ["http/1.1"]
TLS_SECRET_TYPE = "kubernetes.io/tls"


class BadCertificate(Exception):
    pass


def _new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # 1.0/1.1 refused (RFC 8996)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    # Mozilla "intermediate": ECDHE with AEAD ciphers for 1.2; 1.3 suites are fixed by OpenSSL.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    ctx.set_alpn_protocols(ALPN)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def context_from_pem(cert_pem: bytes, key_pem: bytes, where: str) -> ssl.SSLContext:
    """A server context for this pair; BadCertificate if not PEM, mismatched or expired."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise BadCertificate(f"{where}: tls.crt is not a PEM certificate ({exc})") from None
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        raise BadCertificate(f"{where}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    ctx = _new_server_context()
    # load_cert_chain reads files only; write to a private temporary directory and remove.
    with tempfile.TemporaryDirectory(prefix="edgeproxy-tls-") as tmp:
        cert_file = os.path.join(tmp, "tls.crt")
        key_file = os.path.join(tmp, "tls.key")
        with open(cert_file, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise BadCertificate(f"{where}: key does not match the certificate or is not PEM "
                                 f"({exc.reason or exc})") from None  # fmt: skip
    return ctx


def self_signed_pem(common_name: str = "edgeproxy default") -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),  # fmt: skip
    )


def secret_pem(secret: dict[str, Any], where: str) -> tuple[bytes, bytes]:
    if secret.get("type", TLS_SECRET_TYPE) != TLS_SECRET_TYPE:
        raise BadCertificate(f"{where}: type is {secret.get('type')!r}, not {TLS_SECRET_TYPE}")
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    try:
        if "tls.crt" in data and "tls.key" in data:
            return base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])
        return string_data["tls.crt"].encode(), string_data["tls.key"].encode()
    except (KeyError, ValueError, AttributeError, TypeError):
        raise BadCertificate(f"{where}: needs data tls.crt and tls.key (base64 PEM)") from None


class CertificateStore:
    def __init__(self, default_secret: str | None) -> None:
        self.default_secret = default_secret
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        self._contexts: dict[tuple[str, str], tuple[bytes, ssl.SSLContext]] = {}
        self._reported: set[str] = set()  # one log line per problem, not one per rebuild
        self.default = self._self_signed()

    def _self_signed(self) -> ssl.SSLContext:
        self._self_signed_pem = self_signed_pem()
        log.info("no default certificate configured yet: generated a self-signed one")
        return context_from_pem(*self._self_signed_pem, "self-signed default")

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: its SNI callback swaps in the certificate for the name."""
        # Its own certificate is a placeholder: the SNI callback runs for every handshake.
        ctx = context_from_pem(*self._self_signed_pem, "listener")
        ctx.sni_callback = self._on_sni
        return ctx

    def backend_context(self, snapshot: Snapshot, ns: str, name: str, where: str,
                        server_name: str | None) -> ssl.SSLContext:  # fmt: skip
        """Verify backends against the CA in Secret ns/name (ca.crt). A missing or bad CA gives
        a context that trusts nothing: the connection fails (502) rather than go unverified."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = server_name is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(ALPN)
        secret = snapshot.objects.get(("Secret", ns, name))
        label = f"Secret {ns}/{name} (backend CA of {where})"
        try:
            if secret is None:
                raise BadCertificate(f"{label} not found")
            data = secret.get("data") or {}
            if "ca.crt" not in data:
                raise BadCertificate(f"{label} has no ca.crt")
            ctx.load_verify_locations(cadata=base64.b64decode(data["ca.crt"]).decode("ascii"))
        except (BadCertificate, ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
            self._report(f"{exc}; connections to those backends fail until it is fixed")
        return ctx

    def upstream_context(self) -> ssl.SSLContext:
        """Backends speaking TLS: not verified by default, as ingress-nginx."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(ALPN)
        return ctx

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self.wildcard.get(name[dot:])
                if ctx is not None:
                    return ctx
        return self.default

    def _on_sni(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self.context_for(server_name)

    def _load(self, snapshot: Snapshot, ns: str, name: str, where: str) -> ssl.SSLContext | None:
        secret = snapshot.objects.get(("Secret", ns, name))
        label = f"Secret {ns}/{name} ({where})"
        if secret is None:
            self._report(f"{label} not found; its hosts use the default certificate")
            return None
        try:
            cert, key = secret_pem(secret, label)
            fingerprint = hashlib.sha256(cert + b"\0" + key).digest()
            cached = self._contexts.get((ns, name))
            if cached is not None and cached[0] == fingerprint:
                return cached[1]
            ctx = context_from_pem(cert, key, label)
        except BadCertificate as exc:
            self._report(f"{exc}; its hosts use the default certificate")
            return None
        self._contexts[(ns, name)] = (fingerprint, ctx)
        log.info("%s loaded", label)
        return ctx

    def _report(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            log.warning("%s", line)

    def update(self, snapshot: Snapshot, bindings: Iterable[TlsBinding]) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        used: set[tuple[str, str]] = set()
        for binding in bindings:
            ctx = self._load(snapshot, *binding.secret, binding.ingress)
            if ctx is None:
                continue
            used.add(binding.secret)
            for host in binding.hosts:
                if host.startswith("*."):
                    wildcard.setdefault(host[1:], ctx)
                else:
                    exact.setdefault(host, ctx)
        if self.default_secret:
            ns, _, name = self.default_secret.partition("/")
            ctx = self._load(snapshot, ns, name, "--default-certificate")
            if ctx is not None:
                self.default = ctx
                used.add((ns, name))
        for key in list(self._contexts):
            if key not in used:
                del self._contexts[key]
        self.exact, self.wildcard = exact, wildcard
