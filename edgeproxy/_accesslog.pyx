# cython: language_level=3
"""C twin of accesslog.format_line_py: one access log line, formatted into a C buffer.

orjson over a dict cost about 17 us per line on this project's benchmark machine (the dict,
the rounding and the time string in Python), which was 40% of a proxied request; this does
the same work in C: the fields read once, strings JSON-escaped byte by byte, the time from
clock_gettime with the second's part formatted once per second. Same fields and values as
the Python version (tests/test_observability.py compares them, parsed).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.string cimport memchr, memcpy, memmove
from posix.time cimport clock_gettime, timespec, CLOCK_REALTIME

from edgeproxy.hosts cimport EndpointState
from edgeproxy.proxy.exchange cimport Exchange
from edgeproxy.proxy.message cimport RequestHead


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        pass
    tm* gmtime_r(const time_t* timep, tm* result)
    size_t strftime(char* s, size_t maxsize, const char* fmt, const tm* t)


DEF CAP = 8192  # a line longer than this (a huge URL) goes to the Python version

cdef const char* HEX = b"0123456789abcdef"
# Bytes a JSON string takes as they are: printable ASCII but the quote and the backslash.
cdef unsigned char PLAIN[256]
for _c in range(256):
    PLAIN[_c] = 32 <= _c < 127 and _c != 34 and _c != 92

cdef long _second = -1
cdef char _stamp[32]
cdef Py_ssize_t _stamp_len = 0


cdef extern from "<string.h>" nogil:
    void* memrchr(const void* s, int c, size_t n)


cdef class _Buf:
    """A window of at most CAP bytes that one line is formatted into: format_line's own
    array, or the free end of a LineLog's buffer (so a line is written once, in place)."""
    cdef char* data
    cdef Py_ssize_t n
    cdef bint full

    cdef inline void lit(self, bytes s):
        self.raw(PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))

    cdef inline void raw(self, const char* s, Py_ssize_t k) noexcept:
        if self.n + k > CAP:
            self.full = True
            return
        memcpy(self.data + self.n, s, k)
        self.n += k

    cdef void string(self, bytes value):
        """A JSON string of latin-1 bytes (as Python's decode("latin-1") then orjson)."""
        self.escaped(<const unsigned char*>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), False)

    cdef void escaped(self, const unsigned char* p, Py_ssize_t k, bint utf8):
        """`p` JSON-escaped in quotes: bytes >= 0x80 are latin-1 (encoded) or already UTF-8.
        Runs of bytes that need nothing are copied whole (most fields are all such bytes)."""
        cdef Py_ssize_t i = 0, start
        cdef unsigned char c
        if self.n + 6 * k + 2 > CAP:  # the worst case: every byte a \u00XX
            self.full = True
            return
        cdef char* out = self.data
        cdef Py_ssize_t n = self.n
        out[n] = 34
        n += 1
        while i < k:
            start = i
            while i < k and (PLAIN[p[i]] or (utf8 and p[i] >= 128)):
                i += 1
            if i > start:
                memcpy(out + n, p + start, i - start)
                n += i - start
                if i == k:
                    break
            c = p[i]
            i += 1
            if c == 34 or c == 92:
                out[n] = 92
                out[n + 1] = c
                n += 2
            elif c < 32 or c == 127:
                out[n] = 92
                out[n + 1] = 117
                out[n + 2] = 48
                out[n + 3] = 48
                out[n + 4] = HEX[c >> 4]
                out[n + 5] = HEX[c & 15]
                n += 6
            else:  # U+0080..U+00FF in UTF-8
                out[n] = 0xC0 | (c >> 6)
                out[n + 1] = 0x80 | (c & 0x3F)
                n += 2
        out[n] = 34
        self.n = n + 1

    cdef void text(self, object value):
        """A str field, or null; its UTF-8 form is the str's own cache (no copy)."""
        cdef Py_ssize_t k
        cdef const char* p
        if value is None:
            self.raw("null", 4)
        else:
            p = PyUnicode_AsUTF8AndSize(value, &k)
            self.escaped(<const unsigned char*>p, k, True)

    cdef void opt_bytes(self, object value):
        if value is None:
            self.raw("null", 4)
        else:
            self.string(<bytes>value)

    cdef void integer(self, long long value) noexcept:
        cdef char tmp[24]
        cdef int k = 24
        cdef bint negative = value < 0
        if negative:
            value = -value
        while True:
            k -= 1
            tmp[k] = 48 + value % 10
            value //= 10
            if value == 0:
                break
        if negative:
            k -= 1
            tmp[k] = 45
        self.raw(tmp + k, 24 - k)

    cdef void seconds(self, double value) noexcept:
        """Six decimals (rounded to the microsecond), or null for a negative (unmeasured) one."""
        cdef long long us
        cdef char tmp[7]
        cdef int i
        if value < 0:
            self.raw("null", 4)
            return
        us = <long long>(value * 1000000.0 + 0.5)
        self.integer(us // 1000000)
        tmp[0] = 46
        us %= 1000000
        for i in range(6, 0, -1):
            tmp[i] = 48 + us % 10
            us //= 10
        self.raw(tmp, 7)


cdef void _now(_Buf buf) noexcept:
    global _second, _stamp_len
    cdef timespec ts
    cdef tm parts
    cdef char tmp[5]
    cdef int ms
    clock_gettime(CLOCK_REALTIME, &ts)
    if ts.tv_sec != _second:
        _second = ts.tv_sec
        gmtime_r(<time_t*>&ts.tv_sec, &parts)
        _stamp_len = strftime(_stamp, 32, "%Y-%m-%dT%H:%M:%S", &parts)
    buf.raw(_stamp, _stamp_len)
    ms = <int>(ts.tv_nsec // 1000000)
    tmp[0] = 46
    tmp[1] = 48 + ms // 100
    tmp[2] = 48 + (ms // 10) % 10
    tmp[3] = 48 + ms % 10
    tmp[4] = 90
    buf.raw(tmp, 5)


cdef char _LINE[CAP]
cdef _Buf _BUF = _Buf()
_BUF.data = _LINE


def format_line(object exchange, double duration, double upstream):
    """The JSON line (with its newline) for a finished exchange; None if it would not fit in
    CAP bytes (the caller then uses the Python version)."""
    if not _fill(_BUF, exchange, duration, upstream):
        return None
    return PyBytes_FromStringAndSize(_BUF.data, _BUF.n)


cdef bint _fill(_Buf b, object exchange, double duration, double upstream):
    """The line in `b` (from its start); False if it does not fit."""
    cdef Exchange ex = <Exchange?>exchange
    b.n = 0
    b.full = False
    cdef RequestHead req = ex.req
    cdef EndpointState endpoint = ex.picked
    route = ex.route
    request_id = ex.request_id  # the one edgeproxy added, else the client's
    if request_id is None:
        request_id = req.request_id
    agent = req.user_agent
    b.lit(b'{"time":"')
    _now(b)
    b.lit(b'","client":')
    if req.xff is not None and ex.conn.trusted:
        b.text(exchange.client_ip)  # the address the trusted proxy saw
    else:
        b.string(ex.conn.client_ip_bytes)
    b.lit(b',"method":')
    b.string(req.method)
    b.lit(b',"host":')
    b.string(req.authority)
    b.lit(b',"path":')
    b.string(req.target)
    if req.http10:
        b.lit(b',"protocol":"HTTP/1.0","status":')
    else:
        b.lit(b',"protocol":"HTTP/1.1","status":')
    b.integer(ex.status)
    b.lit(b',"bytes_sent":')
    b.integer(ex.sent)
    b.lit(b',"bytes_received":')
    b.integer(ex.received)
    b.lit(b',"duration":')
    b.seconds(duration)
    b.lit(b',"upstream":')
    b.text(None if endpoint is None else endpoint.label)
    b.lit(b',"upstream_connect_time":')
    b.seconds(ex.connect_s)
    b.lit(b',"upstream_header_time":')
    b.seconds(ex.header_at - ex.attempt_at if ex.header_at > 0 and endpoint is not None else -1.0)
    b.lit(b',"upstream_response_time":')
    b.seconds(upstream)
    b.lit(b',"retries":')
    b.integer(ex.attempts - 1 if ex.attempts > 1 else 0)
    b.lit(b',"request_id":')
    b.opt_bytes(request_id)
    b.lit(b',"ingress":')
    if route is None:
        b.lit(b'null,"service":null')
    else:
        b.text(route.ingress)
        b.lit(b',"service":')
        b.text(route.cluster.name)
    b.lit(b',"user_agent":')
    b.opt_bytes(agent)
    b.lit(b'}\n')
    return not b.full


cdef class LineLog:
    """The hot part of accesslog.AccessLog (the Python twin is accesslog.LineLogPy): format
    the line in place at the end of the pending bytes, or count it dropped when the reader is
    too far behind. One buffer, allocated once: no bytes object and no reallocation per line
    (a bytearray grown line by line from empty after each flush cost ~4,000 instructions per
    request in copies). flush() writes from pending() and consume()s what went out."""

    cdef char* mem
    cdef Py_ssize_t start, end, size  # pending bytes are mem[start:end]
    cdef _Buf out
    cdef public Py_ssize_t max_pending, dropped, batch

    def __init__(self, Py_ssize_t max_pending, Py_ssize_t batch):
        # Room for max_pending bytes, the line that crosses it and a line's worst case.
        PyMem_Free(self.mem)
        self.start = self.end = 0
        self.size = max(max_pending, batch) + 2 * CAP
        self.mem = <char*>PyMem_Malloc(self.size)
        if self.mem == NULL:
            raise MemoryError()
        self.out = _Buf()
        self.max_pending = max_pending
        self.dropped = 0
        self.batch = batch

    def __dealloc__(self):
        PyMem_Free(self.mem)

    def __len__(self):
        return self.end - self.start

    cdef int _room(self, Py_ssize_t k) except -1:
        """At least k free bytes after `end`: the pending bytes moved to the front (they are
        few by then: a flush took the rest) or, for a line longer than the buffer, more memory."""
        cdef char* grown
        if self.end + k <= self.size:
            return 0
        if self.mem == NULL:
            raise RuntimeError("LineLog.__init__ was not called")
        memmove(self.mem, self.mem + self.start, self.end - self.start)
        self.end -= self.start
        self.start = 0
        if self.end + k > self.size:
            grown = <char*>PyMem_Realloc(self.mem, self.end + k)
            if grown == NULL:
                raise MemoryError()
            self.mem = grown
            self.size = self.end + k
        return 0

    cpdef write(self, object exchange, double duration, double upstream):
        cdef bytes line
        if self.end - self.start > self.max_pending:
            self.dropped += 1
            return
        self._room(CAP)
        self.out.data = self.mem + self.end
        if _fill(self.out, exchange, duration, upstream):
            self.end += self.out.n
        else:  # longer than CAP (a huge URL)
            line = self.format_long(exchange, duration, upstream)
            self._room(len(line))
            memcpy(self.mem + self.end, PyBytes_AS_STRING(line), len(line))
            self.end += len(line)
        if self.end - self.start >= self.batch:
            self.flush()

    def pending(self):
        """The bytes not written yet, as a read-only view: valid until the next write."""
        return PyMemoryView_FromMemory(self.mem + self.start, self.end - self.start, PyBUF_READ)

    def cut(self, Py_ssize_t limit):
        """How many pending bytes to write so a piece of at most `limit` bytes ends at a line
        end: the last line end within limit, else the first line end, else all."""
        cdef Py_ssize_t k = min(limit, self.end - self.start)
        cdef char* p = self.mem + self.start
        cdef void* nl = memrchr(p, 10, k)
        if nl == NULL:
            nl = memchr(p, 10, self.end - self.start)
            if nl == NULL:
                return self.end - self.start
        return <char*>nl - p + 1

    def consume(self, Py_ssize_t n):
        """The first n pending bytes went out."""
        self.start += min(n, self.end - self.start)
        if self.start == self.end:
            self.start = self.end = 0

    def discard(self):
        """Drop every pending line (the target is gone); how many there were."""
        cdef Py_ssize_t lines = 0
        cdef char* p = self.mem + self.start
        cdef char* stop = self.mem + self.end
        cdef void* nl
        while p < stop:
            nl = memchr(p, 10, stop - p)
            if nl == NULL:
                break
            lines += 1
            p = <char*>nl + 1
        self.start = self.end = 0
        return lines

    def format_long(self, exchange, duration, upstream):
        raise NotImplementedError

    def flush(self):
        raise NotImplementedError
