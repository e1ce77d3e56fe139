"""Find llama.cpp's ``llama-server`` and ``llama-quantize``, building them once from PyPI sources when missing.

llama.cpp is the CPU peer of the benchmarks and the "server we did not write" of the remote-endpoint
tests; ``llama-quantize`` and ``convert_hf_to_gguf.py`` make the K-quant files the benchmarks compare on
(benchmarks/gguf_files.py). Nothing can be downloaded here but packages, so the tools are built from the
llama.cpp sources that the ``llama-cpp-python`` sdist on PyPI vendors: ``pip download`` the sdist, then cmake
builds only the targets asked for (a few minutes on 2 cores). The results are cached per CPU (the build uses
``GGML_NATIVE``) under ``$TGI_NB_CACHE/llama.cpp`` (default ``~/.cache/tgi_nb/llama.cpp``), with the sdist's
``convert_hf_to_gguf.py`` and ``gguf-py`` beside them, so later calls return at once. ``LLAMA_SERVER`` /
``LLAMA_QUANTIZE=/path/to/binary`` skip all of this.

    $ python benchmarks/llama_server.py                  # prints llama-server's path, building it the first time
    $ python benchmarks/llama_server.py llama-quantize   # the same for llama-quantize (and the converter)

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
#: The tools this script builds, and the environment variable naming a binary to use instead.
TOOLS = {"llama-server": "LLAMA_SERVER", "llama-quantize": "LLAMA_QUANTIZE"}


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
    """Where the built tools live: one folder per llama.cpp version and CPU."""
    root = os.environ.get("TGI_NB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tgi_nb")
    return Path(root) / "llama.cpp" / f"{LLAMA_CPP_PYTHON_VERSION}-{_cpu_tag()}"


def converter_path() -> Path:
    """Where the sdist's ``convert_hf_to_gguf.py`` is kept (with the ``gguf-py`` and ``conversion`` packages it
    imports beside it) once a tool was built."""
    return cache_dir() / "convert" / "convert_hf_to_gguf.py"


def _converter_kept() -> bool:
    return (converter_path().parent / ".complete").is_file()


def find_llama_tool(tool: str, build: bool = True, log=print) -> str | None:
    """Return the path of ``tool`` (``llama-server`` or ``llama-quantize``), building it into the cache if
    ``build`` is true.

    Order: its environment variable (``LLAMA_SERVER``, ``LLAMA_QUANTIZE``), then the cache, then a build (``None``
    when ``build`` is false or the build is impossible here: no cmake, no C++ compiler, or the sdist cannot be
    downloaded).

    >>> path = find_llama_tool("llama-quantize", build=False)  # doctest: +SKIP
    """
    if tool not in TOOLS:
        raise ValueError(f"tool: must be one of {', '.join(TOOLS)}, got {tool!r}")
    explicit = os.environ.get(TOOLS[tool])
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"{TOOLS[tool]}={explicit!r} is not an executable file")
        return explicit
    binary = cache_dir() / "bin" / tool
    if binary.is_file() and (tool == "llama-server" or _converter_kept()):
        return str(binary)
    if not build:
        return None
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        log(f"{tool}: cmake or a C++ compiler is missing, cannot build it")
        return None
    return str(_build(tool, log))


def find_llama_server(build: bool = True, log=print) -> str | None:
    """:func:`find_llama_tool` for ``llama-server``.

    >>> path = find_llama_server(build=False)  # doctest: +SKIP
    """
    return find_llama_tool("llama-server", build, log)


def _build(tool: str, log) -> Path:
    # A lock file keeps two sessions from building at once; the second waits, then finds the binary.
    import fcntl

    binary = cache_dir() / "bin" / tool
    binary.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and _converter_kept():
            return binary
        with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
            log(f"{tool}: downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sources")
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp, "-q"], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data") if sys.version_info >= (3, 12) else tar.extractall(tmp)
            source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            _keep_converter(source)
            if not binary.is_file():
                _cmake(source, Path(tmp) / "build", tool, binary, log)
    log(f"{tool}: built {binary}")
    return binary


def _keep_converter(source: Path) -> None:
    """The sdist's HF -> GGUF converter, the gguf-py it imports first (newer than PyPI's gguf, maybe) and its
    per-architecture ``conversion`` package; ``.complete`` marks a whole copy."""
    final = converter_path().parent
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(source / "convert_hf_to_gguf.py", tmp / "convert_hf_to_gguf.py")
    for package in ("gguf-py", "conversion"):
        if (source / package).is_dir():
            shutil.copytree(source / package, tmp / package)
    (tmp / ".complete").write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _cmake(source: Path, build_dir: Path, tool: str, binary: Path, log) -> None:
    # The compiler's warnings run to megabytes: they go to a log beside the binary, not the terminal.
    with open(binary.parent.parent / "build.log", "a") as build_log:
        log(f"{tool}: building with cmake (a few minutes the first time; log: {build_log.name})")
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                       check=True, stdout=build_log, stderr=subprocess.STDOUT)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", tool, "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=build_log, stderr=subprocess.STDOUT)
    built = next(build_dir.glob(f"bin/{tool}"))
    binary.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary.with_suffix(".tmp"))
    os.replace(binary.with_suffix(".tmp"), binary)


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "llama-server"
    path = find_llama_tool(name, log=lambda m: print(m, file=sys.stderr))
    if path is None:
        sys.exit(f"{name} is not available on this machine")
    print(path)
