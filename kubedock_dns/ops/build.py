"""What this build is: the product's version (``kubedock_dns.__version__``, its one source) and
the versions of what it runs on, for ``--version`` and the ``kubedock_dns_build_info`` metric.

Standard library only, and Twisted's version is read from its installed metadata rather than by
importing it, so that ``kubedock-dns --version`` starts as fast as the rest of the command.
"""

from __future__ import annotations

import platform
from importlib import metadata

from kubedock_dns import __version__


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_info() -> dict[str, str]:
    """The labels of ``kubedock_dns_build_info``: ``version``, ``python``, ``twisted``."""
    return {"version": __version__, "python": platform.python_version(), "twisted": _installed("twisted")}


def version_line(program: str = "kubedock-dns") -> str:
    """``kubedock-dns 0.1.0 (Python 3.11.7, Twisted 26.10.0)``: what ``--version`` prints."""
    info = build_info()
    return f"{program} {info['version']} (Python {info['python']}, Twisted {info['twisted']})"
