"""The package version, read from its installed metadata."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def server_version() -> str:
    """``tgi_nb``'s version, or ``0+unknown`` when run from a source tree that is not installed.

    Example:
        >>> isinstance(server_version(), str)
        True
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tgi_nb")
    except PackageNotFoundError:
        return "0+unknown"
