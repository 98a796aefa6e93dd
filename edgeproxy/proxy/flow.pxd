cdef class FlowControl:
    cdef public Py_ssize_t reasons
    cdef public object transport

    cpdef pause(self, Py_ssize_t reason)
    cpdef resume(self, Py_ssize_t reason)
