"""What a finished exchange leaves behind (the finish phase): its route's traffic figures.

Each worker counts into plain lists, one RouteFigures per (namespace, ingress, service); the
supervisor polls them and sums them over the workers into /metrics (edgeproxy.metrics). No
exporter object is touched per request: a count is a list index, a histogram observation a
short scan of the buckets. Labels stay bounded by the configuration: no path, client or endpoint, and methods
outside METHODS count as "other".
"""

from __future__ import annotations

# Seconds. Prometheus' defaults, with the sub-5 ms buckets a proxy in front of fast pods needs.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)  # fmt: skip
N_BUCKETS = len(BUCKETS) + 1  # and +Inf
# Index 0: the exchange ended without a status (the client left, the upstream cut it).
STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
N_CLASSES = len(STATUS_CLASSES)
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other")
METHOD_INDEX = {m.encode(): i for i, m in enumerate(METHODS[:-1])}
OTHER_METHOD = len(METHODS) - 1
UNROUTED = ("", "", "")  # answered before a route was found (404, 400)
# The sizes RouteFigures' arrays are declared with (observe.pxd, and literally below).
assert len(METHODS) * N_CLASSES == 48 and N_CLASSES * N_BUCKETS == 102 and N_CLASSES == 6


def bucket_of(seconds: float) -> int:
    """bisect_left(BUCKETS, seconds): the first bucket that holds it. A scan from the smallest:
    most requests end in the first few buckets, and compiled it compares C doubles (bisect
    compared Python floats, a third of the recording's cost)."""
    buckets = BUCKETS
    last = N_BUCKETS - 1
    for i in range(last):
        bound = buckets[i]  # a C double when compiled: no float object per comparison
        if seconds <= bound:
            return i
    return last


class RouteFigures:
    """One worker's counters for one (namespace, ingress, service) (compiled: observe.pxd)."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "duration_sum", "requests", "upstream",
                 "upstream_sum")  # fmt: skip

    def __init__(self) -> None:
        # Literal sizes: compiled, these are C arrays of these sizes (observe.pxd).
        self.requests = [0] * 48  # [method * N_CLASSES + class]
        self.duration = [0] * 102  # [class * N_BUCKETS + bucket], not cumulative
        self.duration_sum = [0.0] * 6
        self.upstream = [0] * 102
        self.upstream_sum = [0.0] * 6
        self.bytes_in = 0
        self.bytes_out = 0

    def record(self, method: bytes, status: int, duration: float, upstream: float,
               bytes_in: int, bytes_out: int) -> None:  # fmt: skip
        """`upstream`: seconds from the last attempt's start to its response's end; < 0: none."""
        # Typed locals (observe.pxd): compiled, the indexes are C integers and the lists are
        # indexed without generic item calls.
        methods = METHOD_INDEX
        n_buckets = N_BUCKETS
        klass = status // 100 if 100 <= status < 600 else 0
        index = methods.get(method, OTHER_METHOD)
        self.requests[index * N_CLASSES + klass] += 1
        self.duration[klass * n_buckets + bucket_of(duration)] += 1
        self.duration_sum[klass] += duration
        if upstream >= 0.0:
            self.upstream[klass * n_buckets + bucket_of(upstream)] += 1
            self.upstream_sum[klass] += upstream
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def snapshot(self) -> tuple[list[int], list[int], list[float], list[int], list[float], int, int]:
        return (list(self.requests), list(self.duration), list(self.duration_sum),
                list(self.upstream), list(self.upstream_sum), self.bytes_in, self.bytes_out)  # fmt: skip


class ServiceFigures:
    """One worker's upstream counters for one (namespace, service): not per request."""

    __slots__ = ("connect_errors", "connects", "retries")

    def __init__(self) -> None:
        self.connects = 0
        self.connect_errors = 0
        self.retries = 0
