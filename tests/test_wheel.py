"""The package as pip installs it, not the checkout: a wheel built from the source tree, installed into a fresh
virtual environment, builds its native kernels and serves the bundled model on them.

What a notebook's ``pip install "tgi_nb @ git+..."`` gets is the wheel; a file missing from its package data
(a header a kernel includes) makes every kernel build fail there while the editable checkout works, and the
model answers on the torch path, about 60x slower. The test counts tokens and reads /info's ``kernels``,
never a time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run by the fresh environment's interpreter, from a folder outside the checkout: the bundled model behind a
# real server, a completion through the openai client, then /info.
_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("always")
    import httpx, openai, tgi_nb
    from tgi_nb.engine import EngineConfig, LLMEngine
    from tgi_nb.server import ServerSettings, ServerThread, build_app

    with warnings.catch_warnings(record=True) as caught:
        engine = LLMEngine(EngineConfig(max_total_tokens=256))
        server = ServerThread(build_app(engine, ServerSettings(embedding_model=None))).start()
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
            done = client.completions.create(model="tgi", prompt="The capital of France is", max_tokens=16,
                                             temperature=0, extra_body={"ignore_eos": True})
            info = httpx.get(server.url + "/info").json()
        finally:
            server.stop()
            engine.shutdown()
    print(json.dumps({"file": tgi_nb.__file__, "completion_tokens": done.usage.completion_tokens,
                      "kernels": info["kernels"], "weight_formats": info["weight_formats"],
                      "warnings": [str(w.message) for w in caught if "native" in str(w.message)]}))
""")


def _copy_source(dest: Path) -> Path:
    """What a git checkout holds for the build (no build/ leftovers, no caches)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "tgi_nb", dest / "tgi_nb",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info"))
    return dest


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A virtual environment holding the wheel's tgi_nb, with the test environment's other packages (torch,
    transformers, ...) on its path but not its editable tgi_nb: a plain path entry, whose own .pth files (the
    editable install's finder) are not run."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(purelib), str(wheel)], check=True)
    (purelib / "shared_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_wheel_builds_its_kernels_and_serves_the_bundled_model_natively(tmp_path):
    from tgi_nb.models import loader

    if shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler: nothing native to build")
    src = _copy_source(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("tgi_nb-*.whl")
    python = _fresh_venv(tmp_path / "venv", wheel)

    # A kernel cache of its own, so that every kernel is really built from the wheel's sources; the converted
    # bundled model is shared with the other tests (converting it again takes half a minute).
    cache = tmp_path / "cache"
    cache.mkdir()
    (loader.cache_root() / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(loader.cache_root() / "models")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TGI_NB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(python), "-c", _SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert Path(report["file"]).is_relative_to(tmp_path / "venv"), report["file"]   # the wheel's copy ran
    assert report["completion_tokens"] == 16
    assert "q4_1" in report["weight_formats"]                                      # GGUF blocks, as stored
    assert report["warnings"] == []
    assert {"quant_gemm", "decode_step"} <= set(report["kernels"]), report["kernels"]
    assert set(report["kernels"].values()) == {"native"}, report["kernels"]
    assert sorted(p.name.split("_")[0] for p in (cache / "kernels").glob("*.so"))   # built here, from the wheel
