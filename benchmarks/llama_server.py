"""Find llama.cpp's ``llama-server``, building it once from PyPI sources when it is missing.

llama.cpp is the CPU peer of the benchmarks and the "server we did not write" of the remote-endpoint
tests. Nothing can be downloaded here but packages, so the binary is built from the llama.cpp sources
that the ``llama-cpp-python`` sdist on PyPI vendors: ``pip download`` the sdist, then cmake builds only
the ``llama-server`` target (a few minutes on 2 cores). The result is cached per CPU (the build uses
``GGML_NATIVE``) under ``$TGI_NB_CACHE/llama.cpp`` (default ``~/.cache/tgi_nb/llama.cpp``), so later
calls return at once. ``LLAMA_SERVER=/path/to/llama-server`` skips all of this.

    $ python benchmarks/llama_server.py          # prints the path, building it the first time

>>> from llama_server import find_llama_server   # doctest: +SKIP
>>> find_llama_server(build=False)               # doctest: +SKIP
'/root/.cache/tgi_nb/llama.cpp/0.3.36-1a2b3c4d/bin/llama-server'
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: The sdist whose vendored llama.cpp is built; pinned so every machine benchmarks the same peer.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def _cpu_tag() -> str:
    """A short hash of the CPU model and flags: a GGML_NATIVE build only runs on the CPU it was built for."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    info += line
                if line.strip() == "":
                    break
    except OSError:
        info = sys.platform
    return hashlib.sha256(info.encode()).hexdigest()[:8]


def cache_dir() -> Path:
    """Where the built ``llama-server`` lives: one folder per llama.cpp version and CPU."""
    root = os.environ.get("TGI_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgi_nb")
    return Path(root) / "llama.cpp" / f"{LLAMA_CPP_PYTHON_VERSION}-{_cpu_tag()}"


def find_llama_server(build: bool = True, log=print) -> str | None:
    """Return the path of a ``llama-server`` binary, building it into the cache if ``build`` is true.

    Order: ``$LLAMA_SERVER``, then the cache, then a build (``None`` when ``build`` is false or the
    build is impossible here: no cmake, no C++ compiler, or the sdist cannot be downloaded).

    >>> path = find_llama_server(build=False)  # doctest: +SKIP
    """
    explicit = os.environ.get("LLAMA_SERVER")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"LLAMA_SERVER={explicit!r} is not an executable file")
        return explicit
    binary = cache_dir() / "bin" / "llama-server"
    if binary.is_file():
        return str(binary)
    if not build:
        return None
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        log("llama-server: cmake or a C++ compiler is missing, cannot build it")
        return None
    return str(_build(binary, log))


def _build(binary: Path, log) -> Path:
    # A lock file keeps two test sessions from building at once; the second waits, then finds the binary.
    import fcntl

    binary.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
            log(f"llama-server: downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sources")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp, "-q"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else tar.extractall(tmp)
            source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            build_dir = Path(tmp) / "build"
            # The compiler's warnings run to megabytes: they go to a log beside the binary, not the terminal.
            build_log = open(binary.parent.parent / "build.log", "w")
            log(f"llama-server: building with cmake (a few minutes the first time; log: {build_log.name})")
            subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                            "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                           check=True, stdout=build_log, stderr=subprocess.STDOUT)
            subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server",
                            "-j", str(os.cpu_count() or 2)], check=True, stdout=build_log, stderr=subprocess.STDOUT)
            built = next(build_dir.glob("bin/llama-server"))
            binary.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, binary.with_suffix(".tmp"))
            os.replace(binary.with_suffix(".tmp"), binary)
    log(f"llama-server: built {binary}")
    return binary


if __name__ == "__main__":
    path = find_llama_server(log=lambda m: print(m, file=sys.stderr))
    if path is None:
        sys.exit("llama-server is not available on this machine")
    print(path)
