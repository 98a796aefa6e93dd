from edgeproxy.proxy.message cimport ConnectionInfo, RequestHead


cpdef bytes upstream_request_head(RequestHead req, ConnectionInfo conn, object request_id)
