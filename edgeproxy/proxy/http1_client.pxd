# Cython declarations for http1_client.py (pure-Python mode): compiled, the upstream
# connection is an extension type and calls its receiver through the ResponseReceiver base
# (C calls into the exchange, which subclasses it), keeping the imports one-way.

from edgeproxy.hosts cimport EndpointState
from edgeproxy.proxy.flow cimport FlowControl


cdef class ResponseHead:
    cdef public int status
    cdef public bytes head, upgrade
    cdef public object content_length
    cdef public bint chunked

cdef class UpstreamConnection


cdef class ResponseReceiver:
    cpdef response_informational(self, ResponseHead head)
    cpdef response_head(self, ResponseHead head)
    cpdef response_body(self, bytes data)
    cpdef response_flush(self)
    cpdef response_end(self, UpstreamConnection conn)
    cpdef upstream_lost(self, UpstreamConnection conn, object exc)
    cpdef upstream_upgraded(self, bytes rest)
    cpdef tunnel_data(self, bytes data)
    cpdef tunnel_eof(self)
    cpdef upstream_write_paused(self, bint paused)


cdef class UpstreamConnection:
    cdef public EndpointState endpoint
    cdef public list idle_list
    cdef public object transport, parser, send, feed
    cdef public ResponseReceiver receiver
    cdef public FlowControl flow
    cdef public ResponseHead switching
    cdef public bytes raw
    cdef public list wbuf
    cdef public bint in_head, received, reusable, closed, reused, tunnel, skip_body, done
    cdef public Py_ssize_t max_head
    cdef public double idle_since

    cdef _new_parser(self)
    cpdef begin(self, ResponseReceiver receiver, bint skip_body)
    cpdef write(self, bytes data)
    cpdef close(self)
    cpdef abort(self)
    cdef _broken(self, str reason)
