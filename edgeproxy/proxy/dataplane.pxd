# Cython declarations for dataplane.py (pure-Python mode): compiled, the client side reads
# these fields as C struct members instead of through a per-instance dict.

cdef class Dataplane:
    cdef public object settings, loop, table, registry, date, upstream_ssl, _sweeper
    cdef public double now, tick, _last_pool_sweep
    cdef public set connections
    cdef public list status_counts
    cdef public Py_ssize_t upstream_connects, retries, rid_counter
    cdef public bint draining
    cdef public dict host_names, balancer_types
    cdef public bytes rid_prefix
