"""TLS termination: one SSLContext per certificate, chosen by SNI from referenced Secrets.

Secrets are kubernetes.io/tls (data tls.crt / tls.key, base64 PEM) named by served Ingresses'
spec.tls, looked up in the Ingress's namespace. Exact SNI name first, then a wildcard entry,
else the default certificate (--default-certificate, or self-signed at start). A changed Secret
gives a new context for new handshakes; established connections keep theirs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

from edgeproxy.compile import TlsBinding
from edgeproxy.objects import Snapshot
from edgeproxy.routing import TransportProfile

log = logging.getLogger("edgeproxy.tls")

ALPN = ["http/1.1"]
MAX_REMEMBERED_NAMES = 4096  # SNI names whose context a worker remembers
TLS_SECRET_TYPE = "kubernetes.io/tls"


class _SslMethod:
    """`sslobj.<name>` is the method of the _ssl object underneath itself (a C method)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return getattr(ssl.SSLObject, self.name)
        raw = getattr(obj, "_sslobj", None)  # ssl.py's private name: if it goes, ssl.py's method
        if raw is None:
            return getattr(ssl.SSLObject, self.name).__get__(obj, owner)
        return getattr(raw, self.name)


class DirectSSLObject(ssl.SSLObject):
    """ssl.SSLObject whose read, write and pending are the _ssl object's own C methods.

    The event loop's TLS transport (uvloop's SSLProtocol, asyncio's too) looks these three up
    once per connection and calls them for every record; ssl.py's versions only forward the
    call, each through a Python frame (15-30 ns a call here: about 0.1 us of an HTTPS
    request's 15-20 us of user CPU). Callers pass read's length, as both loops do.
    """

    read = _SslMethod("read")  # type: ignore[assignment]
    write = _SslMethod("write")  # type: ignore[assignment]
    pending = _SslMethod("pending")  # type: ignore[assignment]


def direct(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """`ctx` wrapping connections in DirectSSLObject (SSLContext.sslobject_class)."""
    ctx.sslobject_class = DirectSSLObject
    return ctx


class BadCertificate(Exception):
    pass


# Session ticket keys (RFC 5077, and TLS 1.3 resumption): one set for every worker of the pod,
# and with --tls-ticket-key-secret for every replica, so a client resumes wherever it lands
# (nginx ssl_session_ticket_key, HAProxy tls-ticket-keys). OpenSSL 1.1+ takes 80 bytes: a
# 16-byte key name, a 32-byte HMAC key and a 32-byte AES-256 key. Python's ssl module has no
# call for it, so SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS) is reached through ctypes.
TICKET_KEY_BYTES = 80
TICKET_KEY_FIELD = "tls.ticket-key"  # the Secret's data key: at least 32 random bytes
_SET_TICKET_KEYS, _GET_TICKET_KEYS = 59, 58  # SSL_CTRL_{SET,GET}_TLSEXT_TICKET_KEYS
_ssl_ctx_ctrl: Any = None


def _ctx_ctrl() -> Any:
    global _ssl_ctx_ctrl
    if _ssl_ctx_ctrl is None:
        import ctypes
        import ctypes.util

        try:  # _ssl links libssl: its symbols resolve through it, the very library in use
            lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
            ctrl = lib.SSL_CTX_ctrl
        except (AttributeError, OSError):
            lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
            ctrl = lib.SSL_CTX_ctrl
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        ctrl.restype = ctypes.c_long
        _ssl_ctx_ctrl = ctrl
    return _ssl_ctx_ctrl


def _ssl_ctx(ctx: ssl.SSLContext) -> int | None:
    """The SSL_CTX pointer of a context: a PySSLContext is its object header, then that."""
    import ctypes

    return ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Make `ctx` encrypt and decrypt session tickets with `keys` (TICKET_KEY_BYTES); True if
    OpenSSL took them (read back to be sure the context was found)."""
    import ctypes

    if len(keys) != TICKET_KEY_BYTES:
        raise ValueError("ticket keys are 80 bytes")
    try:
        ctrl = _ctx_ctrl()
        handle = _ssl_ctx(ctx)
        if not handle:
            return False
        if ctrl(handle, _SET_TICKET_KEYS, len(keys), ctypes.create_string_buffer(keys, len(keys))) != 1:
            return False
        back = ctypes.create_string_buffer(len(keys))
        return bool(ctrl(handle, _GET_TICKET_KEYS, len(keys), back) == 1 and back.raw == keys)
    except (OSError, AttributeError, ValueError):
        return False


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SET_SESS_CACHE_MODE = 44  # SSL_CTRL_SET_SESS_CACHE_MODE (0: SSL_SESS_CACHE_OFF)


def configure_server(ctx: ssl.SSLContext, min_version: str = "1.2", max_version: str = "1.3",
                     resumption: bool = True) -> None:  # fmt: skip
    """The operator's TLS choices on a server context (nginx ssl_protocols, and
    ssl_session_tickets/ssl_session_cache off when `resumption` is false)."""
    ctx.minimum_version = TLS_VERSIONS[min_version]
    ctx.maximum_version = TLS_VERSIONS[max_version]
    if not resumption:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0  # TLS 1.3 tickets
        handle = _ssl_ctx(ctx)
        if handle:
            _ctx_ctrl()(handle, _SET_SESS_CACHE_MODE, 0, None)  # no session ID cache either


def derive_ticket_keys(material: bytes) -> bytes:
    """80 bytes of ticket keys from a Secret's material (the same material, the same keys on
    every replica)."""
    parts = [hashlib.sha256(label + material).digest() for label in (b"name", b"hmac", b"aes")]
    return parts[0][:16] + parts[1] + parts[2]


def secret_ticket_material(secret: dict[str, Any], where: str) -> bytes:
    data = secret.get("data") or {}
    try:
        if TICKET_KEY_FIELD in data:
            material = base64.b64decode(data[TICKET_KEY_FIELD])
        else:
            material = (secret.get("stringData") or {})[TICKET_KEY_FIELD].encode()
    except (KeyError, ValueError, AttributeError, TypeError):
        raise BadCertificate(f"{where}: needs data {TICKET_KEY_FIELD} (base64)") from None
    if len(material) < 32:
        raise BadCertificate(f"{where}: {TICKET_KEY_FIELD} has {len(material)} bytes; at least 32")
    return material


def _new_server_context() -> ssl.SSLContext:
    ctx = direct(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
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
    try:
        with _pem_files(cert_pem, key_pem) as (cert_file, key_file):
            ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise BadCertificate(f"{where}: key does not match the certificate or is not PEM "
                             f"({exc.reason or exc})") from None  # fmt: skip
    return ctx


@contextlib.contextmanager
def _pem_files(cert_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths load_cert_chain can read (it takes files only): anonymous memory files, so the
    key never touches a disk and a read-only root filesystem is fine; else a private
    temporary directory."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("tls.crt"), os.memfd_create("tls.key")]
        try:
            for fd, pem in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, pem)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="edgeproxy-tls-") as tmp:
        cert_file = os.path.join(tmp, "tls.crt")
        key_file = os.path.join(tmp, "tls.key")
        with open(cert_file, "wb") as f:
            f.write(cert_pem)
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        yield cert_file, key_file


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


def _new_client_context() -> ssl.SSLContext:
    """A context for connections to backends (each caller sets its verification)."""
    ctx = direct(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.set_alpn_protocols(ALPN)
    return ctx


def upstream_context() -> ssl.SSLContext:
    """Backends speaking TLS without a CA named: not verified, as ingress-nginx."""
    ctx = _new_client_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class CertificateStore:
    def __init__(self, default_secret: str | None) -> None:
        self.default_secret = default_secret
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcard: dict[str, ssl.SSLContext] = {}
        self._contexts: dict[tuple[str, str], tuple[bytes, ssl.SSLContext]] = {}
        # What workers need to build the same contexts (CertificateStore.state): by fingerprint.
        self.pems: dict[bytes, tuple[bytes, bytes]] = {}
        self.exact_ids: dict[str, bytes] = {}
        self.wildcard_ids: dict[str, bytes] = {}
        self.default_id = b""
        self._reported: set[str] = set()  # one log line per problem, not one per rebuild
        self.reading: set[tuple[str, str]] = set()  # Secrets the source is reading right now
        self.default = self._self_signed()

    def _self_signed(self) -> ssl.SSLContext:
        self._self_signed_pem = self_signed_pem()
        self._self_signed_id = hashlib.sha256(b"\0".join(self._self_signed_pem)).digest()
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
        ctx = _new_client_context()
        ctx.check_hostname = server_name is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
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

    def state(self) -> tuple[dict[str, bytes], dict[str, bytes], bytes, dict[bytes, tuple[bytes, bytes]]]:  # fmt: skip
        """(exact name -> id, wildcard suffix -> id, default id, id -> PEM pair) for workers."""
        pems = dict(self.pems)
        pems[self._self_signed_id] = self._self_signed_pem
        return self.exact_ids, self.wildcard_ids, self.default_id or self._self_signed_id, pems

    def backend_cas(self, snapshot: Snapshot, refs: Iterable[tuple[str, str]]
                    ) -> dict[tuple[str, str], bytes | None]:  # fmt: skip
        """ca.crt of each backend CA Secret (None when missing), for the workers' contexts."""
        cas: dict[tuple[str, str], bytes | None] = {}
        for ns, name in refs:
            secret = snapshot.objects.get(("Secret", ns, name)) or {}
            data = secret.get("data") or {}
            try:
                cas[(ns, name)] = base64.b64decode(data["ca.crt"]) if "ca.crt" in data else None
            except (ValueError, TypeError):
                cas[(ns, name)] = None
        return cas

    def _load(self, snapshot: Snapshot, ns: str, name: str, where: str) -> ssl.SSLContext | None:
        secret = snapshot.objects.get(("Secret", ns, name))
        label = f"Secret {ns}/{name} ({where})"
        if secret is None:
            if (ns, name) not in self.reading:  # being read: not missing (yet)
                self._report(f"{label} not found; its hosts use the default certificate")
            return None
        try:
            cert, key = secret_pem(secret, label)
            fingerprint = hashlib.sha256(cert + b"\0" + key).digest()
            cached = self._contexts.get((ns, name))
            if cached is not None and cached[0] == fingerprint:
                self._ids[id(cached[1])] = fingerprint
                return cached[1]
            ctx = context_from_pem(cert, key, label)
        except BadCertificate as exc:
            self._report(f"{exc}; its hosts use the default certificate")
            return None
        self._contexts[(ns, name)] = (fingerprint, ctx)
        self.pems[fingerprint] = (cert, key)
        self._ids[id(ctx)] = fingerprint
        log.info("%s loaded", label)
        return ctx

    def _report(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            log.warning("%s", line)

    def update(self, snapshot: Snapshot, bindings: Iterable[TlsBinding]) -> None:
        self._ids: dict[int, bytes] = {}  # id(context) -> fingerprint, for this update
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
        ids = self._ids
        self.exact_ids = {host: ids[id(ctx)] for host, ctx in exact.items()}
        self.wildcard_ids = {suffix: ids[id(ctx)] for suffix, ctx in wildcard.items()}
        if self.default_secret and self.default is not None and id(self.default) in ids:
            self.default_id = ids[id(self.default)]
        live = {fp for fp, _ in self._contexts.values()} | {self.default_id}
        self.pems = {fp: pem for fp, pem in self.pems.items() if fp in live}


class SniCertificates:
    """A worker's certificates: the supervisor's CertificateStore.state, with contexts built
    on the first handshake that needs one (a pod with 10,000 certificates starts without
    10,000 context builds; a renewal costs one build, in the handshake that uses it)."""

    def __init__(self) -> None:
        self.exact: dict[str, bytes] = {}
        self.wildcard: dict[str, bytes] = {}
        self.default_id = b""
        self.pems: dict[bytes, tuple[bytes, bytes]] = {}
        self.contexts: dict[bytes, ssl.SSLContext] = {}
        self.cas: dict[tuple[str, str], bytes | None] = {}
        self.options: dict[str, Any] = {}  # configure_server's keywords (the worker's settings)
        # SNI name -> context, for the handshakes to come (the SNI callback runs in every one).
        self.by_name: dict[str | None, ssl.SSLContext] = {}

    def update(self, exact: dict[str, bytes], wildcard: dict[str, bytes], default_id: bytes,
               pems: dict[bytes, tuple[bytes, bytes]]) -> None:  # fmt: skip
        self.pems.update(pems)
        self.exact, self.wildcard, self.default_id = exact, wildcard, default_id
        self.by_name = {}
        live = set(exact.values()) | set(wildcard.values()) | {default_id}
        for fp in [fp for fp in self.pems if fp not in live]:
            del self.pems[fp]
            self.contexts.pop(fp, None)

    def _context(self, fp: bytes) -> ssl.SSLContext:
        ctx = self.contexts.get(fp)
        if ctx is None:
            ctx = self.contexts[fp] = context_from_pem(*self.pems[fp], "certificate")
            configure_server(ctx, **self.options)
        return ctx

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            fp = self.exact.get(name)
            if fp is None:
                dot = name.find(".")
                if dot > 0:
                    fp = self.wildcard.get(name[dot:])
            if fp is not None:
                return self._context(fp)
        return self._context(self.default_id)

    def _on_sni(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        ctx = self.by_name.get(server_name)
        if ctx is None:
            ctx = self.context_for(server_name)
            if len(self.by_name) >= MAX_REMEMBERED_NAMES:
                self.by_name.clear()  # bounded: a client inventing names costs only lookups
            self.by_name[server_name] = ctx
        sock.context = ctx

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: its SNI callback swaps in the certificate for the name."""
        ctx = context_from_pem(*self.pems[self.default_id], "listener")
        configure_server(ctx, **self.options)  # the listener's versions are the ones offered
        ctx.sni_callback = self._on_sni
        return ctx

    def backend_context(self, profile: TransportProfile, where: str) -> ssl.SSLContext:
        """Verify backends against the profile's CA; without one, trust nothing (502)."""
        ctx = _new_client_context()
        ctx.check_hostname = profile.server_name is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca = self.cas.get(profile.ca_secret) if profile.ca_secret is not None else None
        if ca is not None:
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii"))
            except (ssl.SSLError, ValueError, UnicodeDecodeError):
                pass  # the supervisor reported it (CertificateStore.backend_context)
        return ctx
