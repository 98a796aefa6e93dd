# Cython declarations for upstream.py (pure-Python mode): when compiled, these classes are
# extension types with C-typed fields; without a compiler the .py runs as it is.

from edgeproxy.health cimport EndpointState
from edgeproxy.proxy.downstream cimport DownstreamProtocol


cdef class ResponseHead:
    cdef public int status
    cdef public bytes head, upgrade
    cdef public object content_length
    cdef public bint chunked

cdef class UpstreamConnection:
    cdef public EndpointState endpoint
    cdef public object transport, parser
    cdef public DownstreamProtocol exchange
    cdef public ResponseHead switching
    cdef public bytes raw
    cdef public bint in_head, received, reusable, closed, reused, tunnel, until_close, rechunk
    cdef public bint skip_body, done
    cdef public double idle_since

    cpdef begin(self, DownstreamProtocol exchange, bint skip_body)
    cpdef write(self, bytes data)
    cpdef close(self)
    cpdef abort(self)
    cdef _message_done(self)
