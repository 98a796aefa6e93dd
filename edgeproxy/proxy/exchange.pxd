# Cython declarations for exchange.py (pure-Python mode): compiled, an exchange is an
# extension type; the phases call each other and the upstream connection as C calls. The
# client connection is reached as a Python object (http1_server imports this module).

cimport cython

from edgeproxy.hosts cimport EndpointState
from edgeproxy.proxy.binding cimport ClusterBinding
from edgeproxy.proxy.dataplane cimport Dataplane
from edgeproxy.proxy.flow cimport FlowControl
from edgeproxy.proxy.forward cimport upstream_request_head
from edgeproxy.proxy.http1_client cimport ResponseHead, ResponseReceiver, UpstreamConnection
from edgeproxy.proxy.message cimport ConnectionInfo, RequestHead, host_name, response_framing
from edgeproxy.proxy.observe cimport RouteFigures
from edgeproxy.proxy.pool cimport take_idle


cdef class Exchange


cdef class Downstream:
    cdef public object transport, send
    cdef public FlowControl flow
    cdef public ConnectionInfo info
    cdef public bint closed
    cdef public list wbuf

    cpdef exchange_done(self, Exchange exchange, bint keep_alive)
    cpdef write(self, bytes data)
    cpdef close(self)
    cpdef abort(self)
    cpdef upgrade_refused(self)
    cpdef bytes start_tunnel(self, object tunnel)


cdef class Exchange(ResponseReceiver):
    cdef public Downstream client
    cdef public object route, connect_task, tried, kept, tunnel, pending
    cdef public Dataplane dp
    cdef public RequestHead req
    cdef public ConnectionInfo conn
    cdef public list out, up_buf
    cdef public ClusterBinding binding
    cdef public FlowControl cflow
    cdef public double deadline
    cdef public EndpointState endpoint, picked
    cdef public UpstreamConnection up
    cdef public Py_ssize_t attempts, stage, pending_bytes, kept_bytes, status, framing
    cdef public bytes up_head
    cdef public bint replayable, req_done, resp_started, resp_done, done, discarding
    cdef public bint up_until_close, keep_alive, upgrading
    cdef public double started, attempt_at, header_at, connect_s
    cdef public Py_ssize_t received, sent
    cdef public object request_id

    cpdef start(self)
    @cython.locals(endpoint=EndpointState)  # a typed local: its counters are C fields
    cpdef pick(self)
    cpdef attach(self, UpstreamConnection conn)
    cpdef request_body(self, bytes data)
    cdef _body_piece(self, bytes data)
    cpdef request_end(self)
    cpdef flush_upstream(self)
    @cython.locals(client=Downstream, out=list)
    cpdef flush_client(self)
    cpdef fail(self, Py_ssize_t stage, str reason, bint timeout, bint blame=*)
    cdef _record_failure(self, EndpointState endpoint)
    cpdef _release_endpoint(self)
    cpdef deadline_passed(self)
    cpdef client_lost(self)
    cdef _abort_upstream(self)
    cpdef client_write_paused(self, bint paused)
    cpdef respond_local(self, Py_ssize_t status, bytes body, list extra=*)
    cdef _discard_rest(self)
    cpdef finish(self)
    cpdef finish_aborted(self)
    @cython.locals(figures=RouteFigures, ended=double, duration=double, upstream=double)
    cdef _end(self, bint clean)
