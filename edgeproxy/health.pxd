# Cython declarations for health.py (pure-Python mode): compiled, the exchange reads whether
# anything is ejected as a C field on every pick.

cdef class EndpointRegistry:
    cdef public dict states
    cdef public object clock, outlier, reporter
    cdef public Py_ssize_t ejected_count, ejection_epoch
