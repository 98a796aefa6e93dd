# Cython declarations for dataplane.py (pure-Python mode): compiled, the codecs and the
# exchange read these fields as C struct members instead of through a per-instance dict.

cimport cython

from edgeproxy.health cimport EndpointRegistry


cdef class Dataplane:
    cdef public object settings, loop, table, pool, date, upstream_ssl
    cdef public EndpointRegistry registry
    cdef public object backend_contexts, _sweeper
    cdef public double now, tick, _last_pool_sweep, connect_timeout, read_timeout, panic_percent
    cdef public double client_header_timeout, keepalive_timeout
    cdef public Py_ssize_t max_header_bytes, max_body_bytes
    cdef public Py_ssize_t max_request_line, max_header_line, max_header_count
    cdef public Py_ssize_t max_requests_per_connection, max_connections, max_pipelined
    cdef public double client_body_timeout
    cdef public bint accept_paused, loop_sets_nodelay
    cdef public dict connection_infos
    cdef public double _last_shrink
    cdef public object accept_hook
    cdef public set connections, handshaking
    cdef public list status_counts, tls_results
    cdef public Py_ssize_t retries, rid_counter
    cdef public bint draining
    cdef public dict bindings, key_refs, route_memo, host_names, balancer_types
    cdef public bytes rid_prefix
    cdef public dict figures, service_figures
    cdef public object unrouted, access_log

    @cython.locals(memo=dict)  # its .get a C call, not a method lookup per request
    cpdef object route(self, str host, str path)
    cpdef str remember_host(self, bytes raw, str name)
    cpdef bytes request_id(self)
    cpdef object figures_for(self, object route, object binding)
