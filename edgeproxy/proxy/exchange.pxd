# Cython declarations for exchange.py (pure-Python mode): compiled, an exchange is an
# extension type; the phases call each other and the upstream connection as C calls. The
# client connection is reached as a Python object (http1_server imports this module).

from edgeproxy.hosts cimport EndpointState
from edgeproxy.proxy.binding cimport ClusterBinding
from edgeproxy.proxy.dataplane cimport Dataplane
from edgeproxy.proxy.flow cimport FlowControl
from edgeproxy.proxy.http1_client cimport ResponseHead, UpstreamConnection
from edgeproxy.proxy.message cimport ConnectionInfo, RequestHead


cdef class Exchange:
    cdef public object client, transport, route, connect_task, tried, kept, tunnel
    cdef public Dataplane dp
    cdef public RequestHead req
    cdef public ConnectionInfo conn
    cdef public list out, up_buf, pending
    cdef public ClusterBinding binding
    cdef public FlowControl cflow
    cdef public double deadline
    cdef public EndpointState endpoint
    cdef public UpstreamConnection up
    cdef public Py_ssize_t attempts, stage, pending_bytes, kept_bytes, status, framing
    cdef public bytes up_head
    cdef public bint replayable, req_done, resp_started, resp_done, done, discarding
    cdef public bint up_until_close, keep_alive, upgrading

    cpdef start(self)
    cpdef pick(self)
    cpdef attach(self, UpstreamConnection conn)
    cpdef request_body(self, bytes data)
    cdef _body_piece(self, bytes data)
    cpdef request_end(self)
    cpdef flush_upstream(self)
    cpdef response_informational(self, ResponseHead head)
    cpdef response_head(self, ResponseHead head)
    cpdef response_body(self, bytes data)
    cpdef response_flush(self)
    cpdef response_end(self, UpstreamConnection conn)
    cpdef flush_client(self)
    cpdef upstream_lost(self, UpstreamConnection conn, object exc)
    cpdef fail(self, Py_ssize_t stage, str reason, bint timeout, bint blame=*)
    cdef _record_failure(self, EndpointState endpoint)
    cpdef _release_endpoint(self)
    cpdef deadline_passed(self)
    cpdef client_lost(self)
    cdef _abort_upstream(self)
    cpdef upstream_write_paused(self, bint paused)
    cpdef client_write_paused(self, bint paused)
    cpdef respond_local(self, Py_ssize_t status, bytes body, list extra=*)
    cdef _discard_rest(self)
    cpdef finish(self)
    cpdef finish_aborted(self)
