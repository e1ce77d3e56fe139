"""Building the C kernels in tgi_nb/models/csrc once per machine and loading them with ctypes.

A library is compiled at first use with the system C compiler into the kernel cache
(``$TGI_NB_CACHE/kernels`` or ``~/.cache/tgi_nb/kernels``), under a name that hashes the source, the flags,
the compiler and the CPU's features, so a later process (or another checkout) loads it at once. Callers fall
back to torch when no compiler is found or the build fails; that costs up to 60x in speed, so it is loud: a
:class:`NativeKernelWarning` (which a notebook shows) and :func:`kernel_paths` (what ``/info`` reports).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .loader import cache_root

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# -march=native first; some compilers (older Apple clang) reject it, so a portable build is the second try.
FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fPIC", "-pthread"],
    ["-O3", "-ffast-math", "-fPIC", "-pthread"],
)
# Linked in a separate step without -ffast-math: gcc < 13 otherwise links crtfastmath.o into the shared
# library, which turns on flush-to-zero for the whole process (torch included) the moment it is loaded.
LINK_FLAGS = ["-shared", "-pthread"]


_DISABLE_VALUES = {"0", "false", "no", "off"}


class NativeKernelWarning(RuntimeWarning):
    """A native kernel could not be built or loaded: its products run on torch, many times slower."""


# library -> "native", or why it runs on torch; what /info's `kernels` shows (see kernel_paths)
_PATHS: dict[str, str] = {}


def kernel_paths() -> dict[str, str]:
    """Which path each native library tried in this process runs: ``"native"``, or ``"torch (<why>)"``.

    A library counts as native when any of its functions loaded (the quantized kernels try several CPU
    variants; one that builds is enough).

    Example:
        >>> gemm = NativeFunction("small_gemm", "tgi_nb_small_gemm", [], ["-fopenmp"])
        >>> gemm.get() is None or kernel_paths()["small_gemm"] == "native"
        True
    """
    return dict(_PATHS)


def _record(library: str, failure: Optional[str]) -> None:
    if failure is None:
        _PATHS[library] = "native"
        return
    if _PATHS.get(library) == "native":
        return
    if library not in _PATHS:   # once per library: the quantized kernels try up to four variants
        warnings.warn(f"tgi_nb: could not build or load the native {library} kernel ({failure}); what it "
                      "computes runs on a slower variant or on torch, many times slower. /info's `kernels` "
                      "shows which path runs; the log has the compiler's output.", NativeKernelWarning,
                      stacklevel=2)
    _PATHS[library] = f"torch ({failure})"


def _first_error(output: str) -> str:
    """The compiler's first error, e.g. ``fatal error: rms_norm.h: No such file or directory``.

    Example:
        >>> _first_error("/x/quant_gemm.c:9:10: fatal error: rms_norm.h: No such file or directory\\n 9 | ...")
        'fatal error: rms_norm.h: No such file or directory'
    """
    lines = output.strip().splitlines()
    for line in lines:
        if "error" in line:
            at = line.find("error")
            start = line.rfind(": ", 0, at)   # drop the "file:line:col" the compiler puts first
            return line[start + 2 if start >= 0 else 0:].strip()
    return lines[-1].strip() if lines else "the build failed"


def cache_dir() -> Path:
    """Where built kernels are kept: ``kernels/`` under tgi_nb's cache root (``loader.cache_root``)."""
    return cache_root() / "kernels"


def _owned_by_user(st: os.stat_result) -> bool:
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def trusted(path: Path) -> bool:
    """Whether a file or folder of the kernel cache may be loaded from: it belongs to this user and no one else
    may write it (a library another user could replace runs as this user the moment it is loaded; pip and
    torch's extension cache refuse such files too).

    Example:
        >>> trusted(Path(__file__))
        True
    """
    st = path.stat()
    return _owned_by_user(st) and not st.st_mode & 0o022


def _private_cache() -> Path:
    """The kernel cache folder, created 0700 (tightened if this user made it looser before); a temporary
    folder for this process when the cache belongs to someone else."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = cache.stat()
    if _owned_by_user(st):
        if st.st_mode & 0o077:
            cache.chmod(0o700)
        return cache
    logger.warning("the kernel cache %s belongs to another user: building into a private folder for this "
                   "process instead (set TGI_NB_CACHE to a folder of your own)", cache)
    return _process_cache()


@functools.lru_cache(maxsize=None)
def _process_cache() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tgi_nb-kernels-"))   # 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)   # loaded libraries stay mapped
    return folder


def find_compiler() -> Optional[str]:
    """The C compiler to build kernels with: $CC, cc, gcc or clang, whichever is found first."""
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


@functools.lru_cache(maxsize=None)
def _machine_id() -> str:
    # -march=native code may not run on another CPU sharing the same home directory: key on the CPU's features.
    parts = [platform.system(), platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    parts.append(line.strip())
                if len(parts) >= 4:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _source_with_includes(path: Path, seen: Optional[set] = None) -> bytes:
    """The file's bytes followed by those of every ``#include "..."`` it pulls in (recursively): the cache key of a
    library that includes another source must change when that source does."""
    seen = seen if seen is not None else set()
    seen.add(path)
    text = path.read_bytes()
    parts = [text]
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(b'#include "') and line.endswith(b'"'):
            included = path.parent / line[len(b'#include "'):-1].decode()
            if included not in seen and included.exists():
                parts.append(_source_with_includes(included, seen))
    return b"\0".join(parts)


def compile_library(compiler: str, name: str, extra_flags: Sequence[str] = ()) -> Optional[Path]:
    """Build ``csrc/<name>.c`` into the cache (or find it there); None, with a warning, if it fails
    (a :class:`NativeKernelWarning` once per library, the compiler's output in the log).

    Example:
        >>> path = compile_library(find_compiler(), "paged_attention")   # doctest: +SKIP
    """
    source_file = CSRC / f"{name}.c"
    source = _source_with_includes(source_file)
    cache = _private_cache()
    errors, reasons = [], []
    for base_flags in FLAG_SETS:
        flags = [*base_flags, *extra_flags]
        link_flags = [*LINK_FLAGS, *extra_flags]
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags + link_flags).encode(), os.path.realpath(compiler).encode(),
                        _machine_id().encode()])
        ).hexdigest()[:16]
        target = cache / f"{name}_{key}.so"
        if target.exists():
            if trusted(target):
                return target
            # Built by someone else, or writable by others: build our own over it.
            logger.warning("not loading %s: it is not owned by this user or others may write it; building it "
                           "again", target)
        # Build into private temp files and rename: parallel processes never load a half-written library.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}_", suffix=".so", dir=cache)
        os.close(fd)
        obj = tmp[:-3] + ".o"
        try:
            for cmd in ([compiler, *flags, "-c", "-o", obj, str(source_file)],
                        [compiler, *link_flags, "-o", tmp, obj, "-lm"]):
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    errors.append(f"{' '.join(cmd)}:\n{proc.stderr.strip()[-2000:]}")
                    reasons.append(_first_error(proc.stderr))
                    break
            else:
                os.replace(tmp, target)
                return target
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {exc}")
            reasons.append(str(exc))
        finally:
            for path in (tmp, obj):
                if os.path.exists(path):
                    os.unlink(path)
    logger.warning("could not build the native %s kernel; using the torch path:\n%s", name, "\n".join(errors))
    _record(name, reasons[0] if reasons else "the build failed")
    return None


class NativeFunction:
    """One C function of ``csrc/<library>.c``, compiled (or found in the cache) and loaded on first use.

    ``get()`` returns the ctypes function, or None, with one warning, when there is no compiler or the build
    or load fails; callers then take their torch path. ``switch`` names an environment variable that turns the
    kernel off when set to 0/false/no/off; ``available()`` checks it on every call, so that a test or a notebook
    can flip it without re-importing. Loaded with ``ctypes.CDLL`` (not PyDLL), so the GIL is
    released for the duration of each call and the server's threads run meanwhile.

    Example:
        >>> import ctypes
        >>> gemm = NativeFunction("small_gemm", "tgi_nb_small_gemm", [ctypes.c_void_p] * 5, ["-fopenmp"])
        >>> fn = gemm.get()             # builds once per machine; None without a C compiler
        >>> fn is None or callable(fn)
        True
    """

    def __init__(self, library: str, symbol: str, argtypes: Sequence, extra_flags: Sequence[str] = (),
                 restype=ctypes.c_int, switch: Optional[str] = None):
        self.library, self.symbol, self.switch = library, symbol, switch
        self.argtypes, self.restype, self.extra_flags = list(argtypes), restype, list(extra_flags)
        self._lock = threading.Lock()
        self._function = None
        self._failed = False

    def enabled(self) -> bool:
        """False when the ``switch`` environment variable turns the kernel off."""
        return self.switch is None or os.environ.get(self.switch, "1").strip().lower() not in _DISABLE_VALUES

    def available(self) -> bool:
        """Enabled, and built and loaded (building on first call)."""
        return self.enabled() and self.get() is not None

    def get(self):
        if self._function is not None or self._failed:
            return self._function
        with self._lock:
            if self._function is None and not self._failed:
                self._function = self._build()
                self._failed = self._function is None
        return self._function

    def _build(self):
        compiler = find_compiler()
        if compiler is None:
            logger.warning("no C compiler (cc, gcc, clang or $CC) found; %s uses the torch path", self.symbol)
            _record(self.library, "no C compiler: cc, gcc, clang or $CC")
            return None
        path = compile_library(compiler, self.library, self.extra_flags)
        if path is None:
            return None
        try:
            function = getattr(ctypes.CDLL(str(path)), self.symbol)
        except (OSError, AttributeError) as exc:
            logger.warning("could not load %s from %s (%s); using the torch path", self.symbol, path, exc)
            _record(self.library, f"could not load {path.name}: {exc}")
            return None
        function.restype, function.argtypes = self.restype, self.argtypes
        _record(self.library, None)
        return function
