# Cython declarations for tls_server.py (pure-Python mode): compiled, the TLS layer is an
# extension type; uvloop calls its protocol methods, the codec its transport methods.

cdef class TLSServerTransport:
    cdef public object app, app_factory, context, dp, plain_refusal
    cdef public object tcp, tls, incoming, outgoing
    cdef public object in_write, out_read, tcp_write, tls_pending, tls_read, tls_write
    cdef public double deadline
    cdef public bint closing, eof, fresh, handshaking, paused
    cdef public Py_ssize_t lingering

    cdef _handshake(self, bytes data)
    cdef _handshake_failed(self, str reason)
    cdef _refuse_plain(self)
    cdef _read(self)
    cdef _input_ended(self)
    cdef _flush(self)
