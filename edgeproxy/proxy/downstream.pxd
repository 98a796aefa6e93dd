# Cython declarations for downstream.py (pure-Python mode): when compiled, the client side is
# an extension type with C-typed fields and C calls between its own steps; without a
# compiler the .py runs as it is. Methods not declared here stay Python-callable
# (asyncio and httptools callbacks, and what other modules call).

from edgeproxy.health cimport EndpointState
from edgeproxy.proxy.dataplane cimport Dataplane
from edgeproxy.proxy.upstream cimport ResponseHead, UpstreamConnection


cdef class DownstreamProtocol:
    cdef public Dataplane dp
    cdef public object transport, parser, queued, route
    cdef public EndpointState endpoint
    cdef public object host_header, upgrade, xff, xf_proto, conn_tokens, content_length
    cdef public bytes scheme, port, client_ip_bytes, tunnel_rest, url, method, up_head
    cdef public str client_ip, path
    cdef public bint trusted_peer, upgrading, rare, active, chunked, up_ready, body_sent
    cdef public bint req_done, resp_started, resp_done, discarding, has_body, keep_alive
    cdef public bint http10, expect_continue, has_request_id, stale_retry
    cdef public Py_ssize_t phase, seq, header_bytes, host_count, body_received, attempts
    cdef public Py_ssize_t status, pending_bytes, max_header_bytes, max_body_bytes
    cdef public double deadline, header_timeout, keepalive_timeout, read_timeout
    cdef public list wbuf, headers, fwd, up_wbuf, pending
    cdef public set read_paused_by
    cdef public UpstreamConnection upstream

    cdef _reset_exchange(self)
    cdef _reset_rare(self)
    cdef _pause_reading(self, str reason, bint paused)
    cdef _queue(self, object method, tuple args)
    cdef _special_field(self, bytes lname, bytes value)
    cdef _start_attempt(self, EndpointState exclude)
    cdef _use_endpoint(self, EndpointState endpoint, object cluster)
    cdef _attach(self, UpstreamConnection conn)
    cdef _start_attempt_same(self, EndpointState endpoint)
    cdef _upstream_failed(self, EndpointState endpoint, str reason, bint body_sent, bint timeout=*)
    cdef _release_endpoint(self)
    cdef _close_client(self)
    cdef _count(self)
    cdef _finish(self)
    cpdef flush_upstream(self)
    # What the upstream connection calls (C calls when both are compiled).
    cpdef response_informational(self, ResponseHead head)
    cpdef bint response_head(self, UpstreamConnection conn, ResponseHead head, bint no_body)
    cpdef response_complete(self, UpstreamConnection conn)
    cpdef upstream_upgraded(self, bytes rest)
    cpdef tunnel_to_client(self, bytes data)
    cpdef upstream_broken(self, UpstreamConnection conn, str reason)
    cpdef upstream_lost(self, UpstreamConnection conn, object exc)
    cpdef upstream_paused(self, bint paused)
    cpdef flush_client(self)
    cpdef respond_local(self, Py_ssize_t status, bytes body, list extra=*)
    cpdef fail_client(self, Py_ssize_t status)
