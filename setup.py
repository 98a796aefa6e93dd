"""Build hook: compile the hot path with Cython when a C compiler is at hand: the modules in
HOT_PATH, typed by the .pxd files beside them, and edgeproxy/proxy/_heads.pyx,
the C twins of headers.py's byte helpers. Without a compiler, or with EDGEPROXY_PURE_PYTHON=1,
the same modules install as plain Python and behave the same, slower. Everything else is in
pyproject.toml.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOT_PATH = [
    "edgeproxy/hosts.py",
    "edgeproxy/health.py",
    "edgeproxy/balancing.py",
    "edgeproxy/proxy/flow.py",
    "edgeproxy/proxy/observe.py",
    "edgeproxy/proxy/message.py",
    "edgeproxy/proxy/http1_client.py",
    "edgeproxy/proxy/pool.py",
    "edgeproxy/proxy/forward.py",
    "edgeproxy/proxy/binding.py",
    "edgeproxy/proxy/dataplane.py",
    "edgeproxy/proxy/exchange.py",
    "edgeproxy/proxy/http1_server.py",
    "edgeproxy/proxy/tls_server.py",
    "edgeproxy/proxy/_heads.pyx",
    "edgeproxy/_accesslog.pyx",
]


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python modules in place instead of failing the install.

    All or nothing: the compiled modules know each other's C types (exchange.pxd cimports
    http1_client's, http1_server.pxd the exchange's), so one compiled module beside a pure
    one would fail at run time. If any of them fails to build, none is installed.
    """

    def run(self) -> None:
        self.failed: list[str] = []
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers
            self.failed.append(str(exc))
        if self.failed:
            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                if os.path.exists(built):
                    os.remove(built)
            print(f"edgeproxy: hot path not compiled ({self.failed[0]}); using pure Python",
                  file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self.failed.append(f"{ext.name}: {exc}")


def extensions() -> list:
    if os.environ.get("EDGEPROXY_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("edgeproxy: Cython missing; the hot path stays pure Python", file=sys.stderr)
        return []
    # annotation_typing off: the .pxd files, not the annotations, declare the C types.
    directives = {"language_level": 3, "annotation_typing": False}
    return cythonize(HOT_PATH, compiler_directives=directives, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
