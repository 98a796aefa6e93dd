# Cython declarations for http1_server.py (pure-Python mode): compiled, the client connection
# is an extension type; httptools and asyncio call its Python methods, and it calls the
# exchange as C calls.

from edgeproxy.proxy.dataplane cimport Dataplane
from edgeproxy.proxy.exchange cimport Downstream, Exchange
from edgeproxy.proxy.flow cimport FlowControl
from edgeproxy.proxy.message cimport ConnectionInfo, RequestHead


cimport cython


@cython.locals(n=Py_ssize_t, at=Py_ssize_t, eol=Py_ssize_t)
cpdef Py_ssize_t request_line_end(bytes window, bint mid, Py_ssize_t start, bytes method, bytes target)


cdef class ClientConnection(Downstream):
    cdef public Dataplane dp
    cdef public bytes scheme, port
    cdef public object queued, tunnel, upgrade_rest, backlog
    cdef public object parser, feed
    cdef public double deadline
    cdef public Exchange exchange
    cdef public RequestHead parsing
    cdef public bint parsing_queued, replaying, in_head, eof, write_paused
    cdef public bint feeding, continuation
    cdef public bytes piece
    cdef public object carry
    cdef public bint fresh_piece, boundary, line_mid
    cdef public Py_ssize_t line_end, header_count, requests
    cdef public Py_ssize_t head_fed, body_received, lingering

    cdef object _new_parser(self)
    cdef _consume(self, bytes data)
    cdef _feed(self, bytes data)
    cdef _hold_for_upgrade(self, bytes data)
    cdef _drop_incomplete(self)
    cdef _check_body(self, Exchange exchange, Py_ssize_t size)
    cdef _start(self, RequestHead head)
    cdef _queue(self, Py_ssize_t kind, object payload)
    cdef _protocol_error(self, Py_ssize_t status)
    cdef _replay(self)
    cdef bint _read_on(self)
    cdef _start_queued(self, list queued)
    cpdef _fail(self, Py_ssize_t status)
    cdef _really_close(self)
    cdef _shut(self, bint cut)
