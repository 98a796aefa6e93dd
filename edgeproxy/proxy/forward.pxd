cimport cython

from edgeproxy.proxy.message cimport ConnectionInfo, RequestHead, forwarding_lines


@cython.locals(parts=list, method=bytes, authority=bytes, peer_ip=bytes, real_ip=bytes,
               forwarded_for=bytes, proto=bytes, fwd=list, i=Py_ssize_t, own=bint)
cpdef bytes upstream_request_head(RequestHead req, ConnectionInfo conn, object request_id)
