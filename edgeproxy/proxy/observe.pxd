# Cython declarations for observe.py (pure-Python mode): compiled, recording an exchange is a
# C call on an extension type.

cimport cython

@cython.locals(i=Py_ssize_t, last=Py_ssize_t, buckets=tuple, bound=double)
cpdef Py_ssize_t bucket_of(double seconds)


@cython.final
cdef class RouteFigures:
    # C arrays: a count is one C increment. The sizes are observe.py's (checked at import:
    # a list of another length cannot be assigned to them).
    cdef Py_ssize_t requests[48]  # len(METHODS) * N_CLASSES
    cdef Py_ssize_t duration[102]  # N_CLASSES * N_BUCKETS
    cdef double duration_sum[6]  # N_CLASSES
    cdef Py_ssize_t upstream[102]
    cdef double upstream_sum[6]
    cdef public Py_ssize_t bytes_in, bytes_out

    @cython.locals(methods=dict, n_buckets=Py_ssize_t, klass=Py_ssize_t, index=Py_ssize_t)
    cdef record(self, bytes method, Py_ssize_t status, double duration, double upstream,
                Py_ssize_t bytes_in, Py_ssize_t bytes_out)


cdef class ServiceFigures:
    cdef public Py_ssize_t connects, connect_errors, retries
