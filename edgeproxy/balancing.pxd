# Cython declarations for balancing.py (pure-Python mode): compiled, the built-in balancers are
# extension types whose pick reads EndpointState fields as C struct members. Plug-ins stay
# plain Python classes with the same pick(request, accept) method.

cimport cython

from edgeproxy.hosts cimport EndpointState


cdef class RoundRobin:
    cdef public tuple hosts
    cdef public Py_ssize_t n, next

    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, step=Py_ssize_t, host=EndpointState)
    cpdef pick(self, object request, object accept=*)


cdef class LeastConnections:
    cdef public tuple hosts
    cdef public Py_ssize_t n

    @cython.locals(n=Py_ssize_t, lowest=Py_ssize_t, in_flight=Py_ssize_t, host=EndpointState,
                   a=EndpointState, b=EndpointState, best=EndpointState, ties=list)
    cpdef pick(self, object request, object accept=*)


cdef class ConsistentHash:
    cdef public tuple hosts, points, owners
    cdef public str source
    cdef public bytes name

    @cython.locals(i=Py_ssize_t, count=Py_ssize_t, step=Py_ssize_t, points=tuple)
    cpdef pick(self, object request, object accept=*)
