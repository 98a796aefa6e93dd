# Cython declarations for message.py (pure-Python mode): compiled, RequestHead is an extension
# type whose fields the codec and the exchange read as C struct members.

cdef class ConnectionInfo:
    cdef public bytes client_ip_bytes, peer_ip, port, scheme, forward_lines
    cdef public str client_ip
    cdef public bint trusted

cimport cython


cdef class RequestHead:
    cdef public bytes authority, method, origin, query, target
    cdef public object request_id, user_agent
    cdef public object te, upgrade, xff, xf_proto, forwarded, x_real_ip, host_header, conn_tokens
    cdef public bint body_after_upgrade, chunked, expect_continue, has_request_id, http10
    cdef public bint keep_alive, websocket
    cdef public list fwd
    cdef public Py_ssize_t content_length, host_count, size
    cdef public str path

    @cython.locals(lname=bytes, fwd=list)
    cpdef add_field(self, bytes name, bytes value)
    cdef _special_field(self, bytes lname, bytes value)
    @cython.locals(upgrade=bytes, asks=bint)
    cpdef complete(self, str version, bint keep_alive, Py_ssize_t max_body)
    @cython.locals(target=bytes, authority=bytes, raw_path=bytes, mark=bytes, query=bytes,
                   path=str, normalized=str)
    cdef _target(self)
    cpdef bytes origin_target(self)


cpdef str host_name(bytes authority)
cpdef bytes forwarding_lines(bytes forwarded_for, bytes proto, bytes port, bytes real_ip)
cpdef Py_ssize_t response_framing(int status, object content_length, bint chunked,
                                  bint head_request, bint http10)
