"""HTTPS: SNI certificates from Secrets, rotation, redirects, bad Secrets, TLS to backends."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import warnings
from typing import Any

import pytest
import trustme

from tests import k8s
from tests.backends import Pods
from tests.conftest import eventually, simple_site
from tests.http1 import Client, fetch, read_body, read_head


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_secret(name: str, cert: trustme.LeafCert | None = None, *, crt: bytes | None = None,
               key: bytes | None = None) -> dict[str, Any]:  # fmt: skip
    crt = crt if crt is not None else b"".join(b.bytes() for b in cert.cert_chain_pems)  # type: ignore[union-attr]
    key = key if key is not None else cert.private_key_pem.bytes()  # type: ignore[union-attr]
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": k8s.NS},
            "data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}}  # fmt: skip


def site_with_tls(port: int, tls: list[dict[str, Any]], secrets: list[dict[str, Any]],
                  annotations: dict[str, str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")]),
                                   ("secure.example.com", [k8s.path("/", "web")])],
                          tls=tls, annotations=annotations)  # fmt: skip
    return objs + secrets


async def handshake(port: int, server_name: str | None, *, minimum: ssl.TLSVersion | None = None,
                    maximum: ssl.TLSVersion | None = None) -> tuple[ssl.SSLObject, Client]:  # fmt: skip
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we inspect the certificate ourselves
    ctx.set_alpn_protocols(["http/1.1"])
    if minimum:
        ctx.minimum_version = minimum
    if maximum:
        ctx.maximum_version = maximum
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname=server_name)  # fmt: skip
    return writer.get_extra_info("ssl_object"), Client(reader, writer)


def subject_names(sslobj: ssl.SSLObject) -> list[str]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(sslobj.getpeercert(binary_form=True))  # type: ignore[arg-type]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return []


async def test_certificate_is_chosen_by_sni(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:
    port = await pods.start("127.0.0.2")
    exact = ca.issue_cert("secure.example.com")
    wild = ca.issue_cert("*.wild.example.com")
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "exact"},
                                {"hosts": ["*.wild.example.com"], "secretName": "wild"}],
                         [tls_secret("exact", exact), tls_secret("wild", wild)])  # fmt: skip
    proxy = await proxy_factory(objs, https=True)
    cases = {"secure.example.com": ["secure.example.com"], "a.wild.example.com": ["*.wild.example.com"],
             "unknown.example.org": [], None: []}  # fmt: skip
    for name, expected in cases.items():
        sslobj, client = await handshake(proxy.https, name)
        assert subject_names(sslobj) == expected, name  # [] = the self-signed default
        assert sslobj.selected_alpn_protocol() == "http/1.1"
        resp = await client.request("GET", "/", host=name or "secure.example.com")
        data = json.loads(resp.body)
        assert ["X-Forwarded-Proto", "https"] in data["headers"]
        await client.close()


async def test_tls_1_1_is_refused_and_1_2_and_1_3_work(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), https=True)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        sslobj, client = await handshake(proxy.https, "x", minimum=version, maximum=version)
        assert sslobj.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
        await client.close()
    # A client that offers only TLS 1.1 (SECLEVEL=0 lets this OpenSSL offer it at all) must be
    # refused by the server: the alert says "protocol version", not "no protocols available".
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
        await asyncio.open_connection("127.0.0.1", proxy.https, ssl=ctx, server_hostname="x")
    assert "NO_PROTOCOLS_AVAILABLE" not in str(refused.value), refused.value


async def test_rotated_secret_serves_new_handshakes_and_keeps_old_connections(ca: trustme.CA, pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    first = ca.issue_cert("secure.example.com", not_after=datetime.datetime(2031, 1, 1))
    second = ca.issue_cert("secure.example.com", not_after=datetime.datetime(2032, 1, 1))
    tls = [{"hosts": ["secure.example.com"], "secretName": "cert"}]
    proxy = await proxy_factory(site_with_tls(port, tls, [tls_secret("cert", first)]), https=True)
    old_obj, old_client = await handshake(proxy.https, "secure.example.com")
    old_serial = old_obj.getpeercert(binary_form=True)
    assert (await old_client.request("GET", "/", host="secure.example.com")).status == 200
    k8s.write(manifests, site_with_tls(port, tls, [tls_secret("cert", second)]))
    for _ in range(60):
        await asyncio.sleep(0.05)
        new_obj, new_client = await handshake(proxy.https, "secure.example.com")
        changed = new_obj.getpeercert(binary_form=True) != old_serial
        await new_client.close()
        if changed:
            break
    else:
        raise AssertionError("the rotated certificate never reached new handshakes")
    assert (await old_client.request("GET", "/again", host="secure.example.com")).status == 200
    await old_client.close()


async def test_http_is_redirected_to_https_for_tls_hosts_unless_opted_out(ca: trustme.CA, pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    tls = [{"hosts": ["secure.example.com"], "secretName": "cert"}]
    proxy = await proxy_factory(site_with_tls(port, tls, [tls_secret("cert", cert)]), https=True)
    resp = await fetch(proxy.http, "GET", "/a/b?x=1", host="secure.example.com:8080")
    assert resp.status == 308
    assert resp.header("location") == "https://secure.example.com/a/b?x=1"
    assert (await fetch(proxy.http, "GET", "/", host="plain.example.com")).status == 200
    k8s.write(manifests, site_with_tls(port, tls, [tls_secret("cert", cert)],
                                       {"edgeproxy.io/ssl-redirect": "false"}))  # fmt: skip
    for _ in range(60):
        await asyncio.sleep(0.05)
        if (await fetch(proxy.http, "GET", "/", host="secure.example.com")).status == 200:
            break
    else:
        raise AssertionError("ssl-redirect: false never took effect")


async def test_hsts_annotation_adds_the_header_on_https_only(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                         [tls_secret("cert", cert)],
                         {"edgeproxy.io/hsts": "max-age=600", "edgeproxy.io/ssl-redirect": "false"})  # fmt: skip
    proxy = await proxy_factory(objs, https=True)
    _, client = await handshake(proxy.https, "secure.example.com")
    resp = await client.request("GET", "/", host="secure.example.com")
    assert resp.header("strict-transport-security") == "max-age=600"
    await client.close()
    plain = await fetch(proxy.http, "GET", "/", host="secure.example.com")
    assert plain.header("strict-transport-security") is None


@pytest.mark.parametrize("problem", ["not-pem", "wrong-key", "expired"])
async def test_bad_secret_is_skipped_and_its_hosts_get_the_default(ca: trustme.CA, pods: Pods, proxy_factory: Any, problem: str) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    good = ca.issue_cert("secure.example.com")
    other = ca.issue_cert("other.example.com")
    if problem == "not-pem":
        secret = tls_secret("cert", crt=b"garbage", key=b"garbage")
    elif problem == "wrong-key":
        secret = tls_secret("cert", crt=good.cert_chain_pems[0].bytes(), key=other.private_key_pem.bytes())  # fmt: skip
    else:
        expired = ca.issue_cert("secure.example.com", not_before=datetime.datetime(2020, 1, 1),
                                not_after=datetime.datetime(2021, 1, 1))  # fmt: skip
        secret = tls_secret("cert", expired)
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}], [secret])
    proxy = await proxy_factory(objs, https=True)
    sslobj, client = await handshake(proxy.https, "secure.example.com")
    assert subject_names(sslobj) == []  # the default certificate
    assert (await client.request("GET", "/", host="plain.example.com")).status == 200
    await client.close()
    assert "Secret default/cert" in proxy.log()


async def test_https_backend_by_annotation(ca: trustme.CA, proxy_factory: Any) -> None:
    backend_cert = ca.issue_cert("127.0.0.2")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_cert.configure_cert(server_ctx)
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert head is not None
        await read_body(reader, head, request=True)
        seen.append(head.raw_head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsecured")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.2", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    objs = simple_site(port, "127.0.0.2")
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])],
                          annotations={"edgeproxy.io/backend-protocol": "HTTPS"})  # fmt: skip
    proxy = await proxy_factory(objs)
    resp = await fetch(proxy.http, "GET", "/tls")
    assert resp.status == 200 and resp.body == b"secured"
    assert seen and seen[0].startswith(b"GET /tls HTTP/1.1")
    server.close()


@pytest.mark.parametrize("trusted", [True, False])
async def test_https_backend_verified_against_a_ca_secret(ca: trustme.CA, proxy_factory: Any, trusted: bool) -> None:  # fmt: skip
    backend_cert = ca.issue_cert("web.default.svc")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_cert.configure_cert(server_ctx)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        if head is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nverified")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.2", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trust = ca if trusted else trustme.CA()  # an unrelated CA must not be enough
    ca_secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                 "metadata": {"name": "backend-ca", "namespace": k8s.NS},
                 "data": {"ca.crt": base64.b64encode(trust.cert_pem.bytes()).decode()}}  # fmt: skip
    objs = simple_site(port, "127.0.0.2") + [ca_secret]
    objs[1] = k8s.ingress("site", [(None, [k8s.path("/", "web")])], annotations={
        "edgeproxy.io/backend-protocol": "HTTPS", "edgeproxy.io/backend-ca-secret": "backend-ca",
        "edgeproxy.io/backend-server-name": "web.default.svc"})  # fmt: skip
    proxy = await proxy_factory(objs)
    resp = await fetch(proxy.http, "GET", "/")
    if trusted:
        assert resp.status == 200 and resp.body == b"verified"
    else:
        assert resp.status == 502
    server.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_sessions_are_resumed(ca: trustme.CA, pods: Pods, proxy_factory: Any, version: ssl.TLSVersion) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    proxy = await proxy_factory(site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                                              [tls_secret("cert", cert)]), "--workers", "1", https=True)  # fmt: skip
    one_request = resume_client(ca, proxy.https, version)
    session, reused, data = await asyncio.to_thread(one_request, None)
    assert not reused and data.startswith(b"HTTP/1.1 200")
    _, reused, data = await asyncio.to_thread(one_request, session)
    assert reused and data.startswith(b"HTTP/1.1 200")


def ticket_secret(material: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tickets", "namespace": k8s.NS},
            "data": {"tls.ticket-key": base64.b64encode(material).decode()}}  # fmt: skip


def resume_client(ca: trustme.CA, port: int, version: ssl.TLSVersion) -> Any:
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.minimum_version = ctx.maximum_version = version

    def one(session: ssl.SSLSession | None, to: int = port) -> tuple[ssl.SSLSession | None, bool, bytes]:
        raw = socket.create_connection(("127.0.0.1", to), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="secure.example.com", session=session) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: secure.example.com\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):  # reading lets the TLS 1.3 ticket arrive
                data += chunk
            return tls.session, tls.session_reused, data

    return one


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_session_resumes_in_every_worker(ca: trustme.CA, pods: Pods, proxy_factory: Any, version: ssl.TLSVersion) -> None:  # fmt: skip
    """The workers share the pod's ticket keys: new connections spread over both workers
    (SO_REUSEPORT), and every one resumes the first connection's session."""
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    proxy = await proxy_factory(site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                                              [tls_secret("cert", cert)]), "--workers", "2", https=True)  # fmt: skip
    one = resume_client(ca, proxy.https, version)
    session, reused, data = await asyncio.to_thread(one, None)
    assert not reused and data.startswith(b"HTTP/1.1 200")
    resumed = [(await asyncio.to_thread(one, session))[1] for _ in range(16)]  # 2^-15: all one worker
    assert all(resumed), resumed


async def test_ticket_keys_from_a_secret_resume_across_replicas_and_rotate(ca: trustme.CA, pods: Pods, proxy_factory: Any, manifests: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                         [tls_secret("cert", cert), ticket_secret(b"k" * 48)])  # fmt: skip
    flags = ("--workers", "1", "--tls-ticket-key-secret", f"{k8s.NS}/tickets")
    first = await proxy_factory(objs, *flags, https=True)
    second = await proxy_factory(objs, *flags, https=True)  # another replica, the same Secret
    version = ssl.TLSVersion.TLSv1_3
    one = resume_client(ca, first.https, version)
    session, reused, _ = await asyncio.to_thread(one, None)
    assert not reused
    _, reused, data = await asyncio.to_thread(one, session, second.https)
    assert reused and data.startswith(b"HTTP/1.1 200")  # made by one replica, resumed by the other
    # Rotation: a new key in the Secret. Old tickets then get a full handshake, never a failure.
    k8s.write(manifests, [o for o in objs if o["metadata"]["name"] != "tickets"] + [ticket_secret(b"n" * 48)])

    async def rotated() -> bool:
        return all(p.log().count("session ticket keys from Secret") >= 2 for p in (first, second))

    await eventually(rotated, what="both replicas using the new key")
    _, reused, data = await asyncio.to_thread(one, session, second.https)
    assert not reused and data.startswith(b"HTTP/1.1 200")
    session, _, _ = await asyncio.to_thread(one, None, second.https)
    _, reused, data = await asyncio.to_thread(one, session, first.https)
    assert reused and data.startswith(b"HTTP/1.1 200")


async def test_a_ticket_key_secret_that_is_too_short_is_reported_and_tls_still_works(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                         [tls_secret("cert", cert), ticket_secret(b"short")])  # fmt: skip
    proxy = await proxy_factory(objs, "--tls-ticket-key-secret", f"{k8s.NS}/tickets", https=True)
    one = resume_client(ca, proxy.https, ssl.TLSVersion.TLSv1_3)
    _, _, data = await asyncio.to_thread(one, None)
    assert data.startswith(b"HTTP/1.1 200")
    assert "tls.ticket-key has 5 bytes; at least 32" in proxy.log()


async def test_tls_versions_and_resumption_are_the_operators_choice(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    objs = site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}], [tls_secret("cert", cert)])
    proxy = await proxy_factory(objs, "--tls-max-version", "1.2", "--tls-session-resumption", "off", https=True)
    one = resume_client(ca, proxy.https, ssl.TLSVersion.TLSv1_2)
    session, reused, data = await asyncio.to_thread(one, None)
    assert data.startswith(b"HTTP/1.1 200")
    _, reused, _ = await asyncio.to_thread(one, session)
    assert not reused  # every handshake is full
    only_13 = resume_client(ca, proxy.https, ssl.TLSVersion.TLSv1_3)
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(only_13, None)


def memory_tls_pair(ca: trustme.CA) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A server and a client SSLObject over memory BIOs, handshaken, the server's made by the
    data plane's own context (tls.context_from_pem)."""
    from edgeproxy import tls

    cert = ca.issue_cert("secure.example.com")
    server_ctx = tls.context_from_pem(b"".join(b.bytes() for b in cert.cert_chain_pems),
                                      cert.private_key_pem.bytes(), "test")  # fmt: skip
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, to_client, server_side=True)
    client = client_ctx.wrap_bio(to_client, to_server, server_hostname="secure.example.com")
    for _ in range(10):  # a handshake is a few flights; bounded
        done = 0
        for end in (client, server):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if done == 2:
            break
    else:
        raise AssertionError("no handshake over memory BIOs")
    return server, client


def test_the_data_planes_tls_objects_read_and_write_through_the_c_methods(ca: trustme.CA) -> None:
    """The event loop looks up read/write/pending once per connection: they must be the _ssl
    object's own (no ssl.py frame per record) and behave as ssl.SSLObject's: lengths, buffers,
    records split over reads, pending bytes, and close_notify as b""."""
    server, client = memory_tls_pair(ca)
    assert type(server).__name__ == "DirectSSLObject"
    for name in ("read", "write", "pending"):
        assert getattr(server, name).__self__ is server._sslobj  # type: ignore[attr-defined]
    payload = bytes(range(256)) * 300  # 76,800 bytes: five TLS records
    assert server.write(payload) == len(payload)
    received = b""
    for _ in range(100):
        try:
            received += client.read(65536)
        except ssl.SSLWantReadError:
            break
    assert received == payload
    client.write(b"ping" * 10)
    assert server.read(3) == b"pin" and server.pending() == 37
    buffer = bytearray(100)
    assert server.read(100, buffer) == 37 and bytes(buffer[:37]) == (b"ping" * 10)[3:]
    assert server.pending() == 0
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)
    try:
        client.unwrap()  # sends close_notify
    except ssl.SSLWantReadError:
        pass
    assert server.read(1024) == b""


async def test_large_bodies_cross_https_both_ways_intact(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    """Many records per message on the TLS listener: a 1 MiB upload and a 1 MiB download on
    one keep-alive connection, byte for byte."""
    import hashlib

    port = await pods.start("127.0.0.2")
    cert = ca.issue_cert("secure.example.com")
    proxy = await proxy_factory(site_with_tls(port, [{"hosts": ["secure.example.com"], "secretName": "cert"}],
                                              [tls_secret("cert", cert)]), https=True)  # fmt: skip
    _, client = await handshake(proxy.https, "secure.example.com")
    try:
        upload = bytes(range(251)) * 4178  # 1,048,678 bytes, not a multiple of a record
        resp = await client.request("POST", "/upload", host="secure.example.com", body=upload)
        assert resp.status == 200
        seen = json.loads(resp.body)
        assert seen["body_len"] == len(upload) and seen["sha256"] == hashlib.sha256(upload).hexdigest()
        resp = await client.request("GET", "/big/1048576", host="secure.example.com")
        assert resp.status == 200 and resp.body == b"x" * 1048576
    finally:
        await client.close()


class MemoryTLSClient:
    """A TLS client over a plain TCP stream and memory BIOs, so that a test decides when
    close_notify goes out (an asyncio SSL stream sends it only as it closes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server_name: str) -> None:  # fmt: skip
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)

    @classmethod
    async def connect(cls, port: int, server_name: str) -> MemoryTLSClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer, server_name)
        for _ in range(20):
            try:
                client.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                client.writer.write(client.outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the server closed during the handshake"
                client.incoming.write(data)
        else:
            raise AssertionError("no handshake")
        client.writer.write(client.outgoing.read())
        return client

    def send(self, data: bytes, *, then_close_notify: bool = False) -> None:
        self.tls.write(data)
        if then_close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass  # sent; the server's comes later
        self.writer.write(self.outgoing.read())  # one flight: the request and close_notify

    async def read_to_close_notify(self) -> bytes:
        """Plaintext until the server's close_notify (or the TCP end)."""
        received = b""
        for _ in range(1000):
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                return received
            self.incoming.write(data)
            for _ in range(1000):
                try:
                    chunk = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    return received
                if not chunk:
                    return received
                received += chunk
        raise AssertionError("no end")


async def test_a_request_followed_by_close_notify_is_still_answered(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    """close_notify right after a request is the TLS form of a half-close (RFC 8446 6.1): the
    request is answered, then the server sends its own close_notify, as over plain TCP."""
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), https=True)
    client = await MemoryTLSClient.connect(proxy.https, "x")
    try:
        client.send(b"GET /slow/50 HTTP/1.1\r\nHost: x\r\n\r\n", then_close_notify=True)
        answer = await client.read_to_close_notify()
    finally:
        client.writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:200]
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))  # fmt: skip
    assert len(body) == length and json.loads(body)["target"] == "/slow/50"


async def test_plain_http_on_the_https_port_is_answered_400(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    """As nginx: "The plain HTTP request was sent to HTTPS port", in plain text, then the
    connection closes; TLS on the same port still works."""
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), https=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's close
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"the plain HTTP request was sent to HTTPS port\n")
    _, client = await handshake(proxy.https, "x")
    assert (await client.request("GET", "/", host="x")).status == 200
    await client.close()


async def test_a_client_that_never_finishes_its_handshake_is_closed_after_the_header_timeout(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    """The handshake is bounded by --client-header-timeout (as nginx's client_header_timeout
    was before ssl_handshake_timeout), not left open for the loop's 60 s; and each way a
    handshake ends is counted in edgeproxy_tls_handshakes_total."""
    from tests.test_observability import scrape, value

    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), "--client-header-timeout", "1",
                                https=True)  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https)
    try:
        writer.write(b"\x16\x03\x01")  # the start of a TLS record, and nothing more
        assert await asyncio.wait_for(reader.read(), 15) == b""  # closed by the server
    finally:
        writer.close()
    _, client = await handshake(proxy.https, "x")  # completed
    await client.close()
    for hello in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain_http
                  b"\x16\x03\x01\x00\x05hello"):  # failed: not a ClientHello
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.https)
        writer.write(hello)
        await asyncio.wait_for(reader.read(), 10)  # to the server's close
        writer.close()
    expected = {"completed": 1, "failed": 1, "timed_out": 1, "plain_http": 1}

    async def counted() -> bool:
        families = await scrape(proxy.admin)
        return all(value(families, "edgeproxy_tls_handshakes_total", result=result) == n
                   for result, n in expected.items())  # fmt: skip

    await eventually(counted, 20, "the handshake counters")


async def test_a_slow_https_client_holds_the_upstream_back(ca: trustme.CA, pods: Pods, proxy_factory: Any) -> None:  # fmt: skip
    """The TLS layer passes the socket's write pressure on to the codec: a client that does
    not read a 64 MiB download makes edgeproxy stop reading the upstream, not buffer it all."""
    size = 64 * 1024 * 1024
    port = await pods.start("127.0.0.2")
    proxy = await proxy_factory(simple_site(port, "127.0.0.2"), https=True)
    before = proxy.rss_kib()
    _, client = await handshake(proxy.https, "x")
    try:
        await client.send_raw(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        head = await read_head(client.reader)
        assert head is not None and head.status == 200
        await asyncio.sleep(0.5)  # not reading: what edgeproxy holds meanwhile is what it buffered
        held_mib = (proxy.rss_kib() - before) / 1024
        received = [0]
        await read_body(client.reader, head, request=False, sink=received)
        assert received[0] == size
    finally:
        await client.close()
    assert held_mib < 32, f"edgeproxy grew by {held_mib:.0f} MiB while its client did not read"
