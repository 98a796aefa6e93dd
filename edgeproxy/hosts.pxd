# Cython declarations for hosts.py (pure-Python mode): compiled, EndpointState is an extension
# type, so the hot path counts requests in flight as C fields.

cdef class EndpointState:
    cdef public tuple key
    cdef public str address, label
    cdef public object port
    cdef public Py_ssize_t in_flight, requests, failures, consecutive_failures, ejections
    cdef public double ejected_until
    cdef public bint draining
