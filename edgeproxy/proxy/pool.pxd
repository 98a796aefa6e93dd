cimport cython

from edgeproxy.proxy.http1_client cimport UpstreamConnection


@cython.locals(conn=UpstreamConnection)  # typed: closed and reused are C fields
cpdef UpstreamConnection take_idle(list idle)


cdef class UpstreamPool:
    cdef public object loop
    cdef public Py_ssize_t max_idle, connects, max_head
    cdef public dict idle, profiles

    cpdef put(self, UpstreamConnection conn, double now)
