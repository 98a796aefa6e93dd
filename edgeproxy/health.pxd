# Cython declarations for health.py (pure-Python mode): compiled, EndpointState is an extension
# type, so the hot path counts requests in flight and takes pooled connections as C fields.

cdef class EndpointState:
    cdef public tuple key
    cdef public str address, label
    cdef public object port
    cdef public Py_ssize_t in_flight, requests, failures, consecutive_failures, ejections
    cdef public double ejected_until
    cdef public list idle
    cdef public bint draining
