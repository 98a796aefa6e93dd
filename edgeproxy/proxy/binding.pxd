from edgeproxy.hosts cimport EndpointState


cdef class ClusterBinding:
    cdef public object balancer, cluster, outlier, profile, tls_context
    cdef public tuple hosts, keys
    cdef public dict pools, figures
    cdef public object service_figures
    cdef public Py_ssize_t healthy, healthy_epoch
