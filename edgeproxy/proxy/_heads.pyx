# cython: language_level=3
"""C twins of the head helpers in headers.py (scan_response_head_py, join_bytes_py,
prefixed_hex16_py): same contracts, same results (tests/test_heads.py runs both).

scan_response_head: the response head in one pass over the bytes, with no Python object per
line; a head whose Connection field names other fields goes to the Python version (rare).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcpy

from edgeproxy.config import SERVER_NAME

cdef bytes SERVER_LINE = b"Server: %s\r\n" % SERVER_NAME.encode()


cdef inline unsigned char lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef bint starts(const unsigned char* line, Py_ssize_t n, const char* name, Py_ssize_t k) noexcept nogil:
    """line[:k], lower-cased, equals `name` (lower-case, k bytes)."""
    cdef Py_ssize_t i
    if n < k:
        return False
    for i in range(k):
        if lower(line[i]) != <unsigned char>name[i]:
            return False
    return True


cdef bytes stripped(const unsigned char* p, Py_ssize_t n):
    while n and (p[0] == 32 or p[0] == 9):
        p += 1
        n -= 1
    while n and (p[n - 1] == 32 or p[n - 1] == 9):
        n -= 1
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef bint plain_connection(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Every comma-separated token is close, keep-alive or upgrade (or empty)."""
    cdef Py_ssize_t i = 0, start, end
    while i <= n:
        start = i
        while i < n and p[i] != 44:
            i += 1
        end = i
        while start < end and (p[start] == 32 or p[start] == 9):
            start += 1
        while end > start and (p[end - 1] == 32 or p[end - 1] == 9):
            end -= 1
        if end > start and not (
            (end - start == 5 and starts(p + start, 5, b"close", 5))
            or (end - start == 10 and starts(p + start, 10, b"keep-alive", 10))
            or (end - start == 7 and starts(p + start, 7, b"upgrade", 7))
        ):
            return False
        i += 1
    return True


cdef python_version(bytes raw):
    from edgeproxy.proxy.headers import scan_response_head_py

    return scan_response_head_py(raw)


def scan_response_head(bytes raw):
    """-> (head for the client, Content-Length value or None, chunked, Upgrade value)."""
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t pos, eol, length, out_len = 0
    cdef const unsigned char* line
    cdef const unsigned char* nl
    cdef unsigned char c
    cdef bint has_server = False, chunked = False, dropped = False, drop
    cdef object content_length = None
    cdef bytes upgrade = b""
    cdef unsigned char* out = <unsigned char*>malloc(n + 32)
    if out == NULL:
        raise MemoryError()
    try:
        nl = <const unsigned char*>memchr(src, 10, n)
        if nl == NULL or nl - src < 8:
            return python_version(raw)
        pos = nl - src + 1  # past the status line
        if src[5] == 49 and src[6] == 46 and src[7] == 49:  # "1.1"
            memcpy(out, src, pos)
            out_len = pos
        else:  # edgeproxy speaks HTTP/1.1 to the client (RFC 9110 6.2)
            memcpy(out, b"HTTP/1.1", 8)
            memcpy(out + 8, src + 8, pos - 8)
            out_len = pos
        while pos < n:
            line = src + pos
            nl = <const unsigned char*>memchr(line, 10, n - pos)
            eol = (nl - src + 1) if nl != NULL else n
            length = eol - pos - 2 if eol - pos >= 2 else eol - pos  # without CRLF
            c = lower(line[0])
            drop = False
            if c == 99:  # c
                if starts(line, length, b"content-length:", 15):
                    content_length = stripped(line + 15, length - 15)
                elif starts(line, length, b"connection:", 11):
                    if not plain_connection(line + 11, length - 11):
                        return python_version(raw)  # names other fields: rare
                    drop = True
            elif c == 116:  # t
                if starts(line, length, b"transfer-encoding:", 18):
                    value = stripped(line + 18, length - 18).lower()
                    chunked = value.endswith(b"chunked")
                    drop = True  # re-framed per hop (RFC 9112 6.1): the exchange adds its own
            elif c == 107:  # k
                drop = starts(line, length, b"keep-alive:", 11)
            elif c == 112:  # p
                drop = starts(line, length, b"proxy-", 6)
            elif c == 117:  # u
                if starts(line, length, b"upgrade:", 8):
                    upgrade = stripped(line + 8, length - 8)
                    drop = True
            elif c == 115:  # s
                if starts(line, length, b"server:", 7):
                    has_server = True
            elif c == 32 or c == 9:
                drop = dropped  # obs-fold: continues the field above
            dropped = drop
            if not drop:
                memcpy(out + out_len, line, eol - pos)
                out_len += eol - pos
            pos = eol
        head = PyBytes_FromStringAndSize(<const char*>out, out_len)
    finally:
        free(out)
    if not has_server:
        head += SERVER_LINE
    return head, content_length, chunked, upgrade


def join_bytes(list parts):
    """b"".join(parts) for a list of bytes, without the buffer protocol per item (the
    upstream request head is some 25 small pieces)."""
    cdef Py_ssize_t total = 0, at = 0, size
    cdef object part
    for part in parts:
        if type(part) is not bytes:
            return b"".join(parts)
        total += PyBytes_GET_SIZE(part)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dest = PyBytes_AS_STRING(out)
    for part in parts:
        size = PyBytes_GET_SIZE(part)
        memcpy(dest + at, PyBytes_AS_STRING(part), size)
        at += size
    return out


cdef const char* HEX = b"0123456789abcdef"


def prefixed_hex16(bytes prefix, unsigned long long value):
    """prefix + b"%016x" % value in one allocation: no format machinery, no concatenation."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(prefix)
    out = PyBytes_FromStringAndSize(NULL, n + 16)
    cdef char* dest = PyBytes_AS_STRING(out)
    cdef int i
    memcpy(dest, PyBytes_AS_STRING(prefix), n)
    for i in range(n + 15, n - 1, -1):
        dest[i] = HEX[value & 15]
        value >>= 4
    return out
