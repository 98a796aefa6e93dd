"""Build hook: compile the hot path with Cython when a C compiler is at hand:
edgeproxy/proxy/{upstream,downstream,dataplane}.py and edgeproxy/health.py, typed by the .pxd
files beside them, and edgeproxy/proxy/_heads.pyx, the C twins of headers.py's byte helpers.
Without a compiler, or with EDGEPROXY_PURE_PYTHON=1, the same modules install as plain Python
and behave the same, slower. Everything else is in pyproject.toml.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOT_PATH = [
    "edgeproxy/proxy/upstream.py",
    "edgeproxy/proxy/downstream.py",
    "edgeproxy/proxy/dataplane.py",
    "edgeproxy/proxy/_heads.pyx",
    "edgeproxy/health.py",
]


class OptionalBuildExt(build_ext):
    """A failed compile leaves the pure-Python module in place instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers
            print(f"edgeproxy: hot path not compiled ({exc}); using pure Python", file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"edgeproxy: {ext.name} not compiled ({exc}); using pure Python", file=sys.stderr)


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
