"""Endpoints inside a real Jupyter kernel (ipykernel through jupyter_client), as a notebook user runs them:
create -> wait -> streaming chat -> pause -> resume -> scale_to_zero -> next request -> delete; the same cell
run twice; two endpoints at once, protected and public; the process backend; connect() to a tgi_nb server
started as a separate process; nest_asyncio applied; kernel shutdown stopping servers and child processes.

The kernel runs this interpreter (the repository's .venv), from a kernel spec written to a temporary folder,
so no kernel needs to be installed. It inherits HF_HUB_OFFLINE=1 from conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from server_fixtures import listening, wait_until

REPO = Path(__file__).resolve().parents[1]
KERNEL_NAME = "tgi-nb-test"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def kernel_manager(spec_root: Path):
    """A KernelManager for an ipykernel running this interpreter (the repository's .venv when pytest runs
    from it), whatever kernels the machine has installed."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = spec_root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tgi_nb tests", "language": "python",
        "env": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    }))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")], ensure_native_kernel=False)
    # A kernel asked to shut down runs its exit handlers (stopping servers and child processes): on a loaded
    # machine that can take longer than jupyter_client's default 5 s before it kills the kernel.
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs, shutdown_wait_time=120)


class Kernel:
    """A started kernel; ``run(code)`` executes a cell and returns its output, or fails with the traceback."""

    def __init__(self, spec_root: Path):
        self.km = kernel_manager(spec_root)
        self.km.start_kernel(cwd=str(REPO))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str, timeout: float = 300) -> str:
        """Run a cell; return what it printed to stdout (its stderr, progress bars included, only shows up in
        the failure message)."""
        code = textwrap.dedent(code)
        out: list[str] = []
        err: list[str] = []

        def hook(msg) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                (out if content["name"] == "stdout" else err).append(content["text"])
            elif kind in ("execute_result", "display_data"):
                if "application/vnd.jupyter.widget-view+json" in content["data"]:
                    return  # wait()'s progress bar, a widget once ipywidgets is installed: not printed output
                out.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                out.append("\n".join(content["traceback"]))

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook, allow_stdin=False)
        text = _ANSI.sub("", "".join(out))
        if reply["content"]["status"] != "ok":
            raise AssertionError(f"cell failed:\n{code}\n--- output ---\n{text}\n--- stderr ---\n"
                                 f"{_ANSI.sub('', ''.join(err))}")
        return text

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


def setup_code(tiny: str, qwen: str) -> str:
    return f"""
        import os, socket, time
        import httpx, openai
        from openai import OpenAI
        import tgi_nb
        from tgi_nb import create_inference_endpoint

        TINY, QWEN = {tiny!r}, {qwen!r}
        SMALL = {{"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "4096"}}
        MESSAGES = [{{"role": "user", "content": "Hello"}}]

        def listening(port):
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        def ask(url, key="-", **kw):
            client = OpenAI(base_url=url + "/v1/", api_key=key, max_retries=0)
            return client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, **kw)
    """


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return str(tiny_model_dir("llama")), str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, models):
    k = Kernel(tmp_path_factory.mktemp("kernelspec"))
    k.run(setup_code(*models))
    yield k
    k.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return "\nState:\tZ" in status  # exited, waiting for a reaper


def test_life_cycle_in_a_kernel(kernel):
    kernel.run("""
        endpoint = create_inference_endpoint("life", repository=TINY, type="protected", token="k",
                                             custom_image={"health_route": "/health", "env": SMALL})
        # Returned at once: the kernel is free while the model loads in the background.
        assert endpoint.status in ("pending", "initializing") and endpoint.url is None, endpoint
    """)
    kernel.run("""
        endpoint.wait(timeout=180)
        assert endpoint.status == "running"
        client = OpenAI(base_url=os.path.join(endpoint.url, "v1/"), api_key="k", max_retries=0)
        stream = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        endpoint.pause()
        assert endpoint.status == "paused"
        try:
            ask(endpoint.url, "k")
            raise AssertionError("a paused endpoint answered")
        except openai.InternalServerError as err:
            assert err.status_code == 503

        endpoint.resume()
        endpoint.wait(timeout=180)
        assert endpoint.status == "running"

        endpoint.scale_to_zero()
        assert endpoint.status == "scaledToZero"
        assert ask(endpoint.url, "k").choices[0].message.content   # wakes the model
        assert endpoint.fetch().status == "running"

        port = int(endpoint.url.rsplit(":", 1)[1])
        endpoint.delete()
        assert not listening(port)
    """)


def test_the_same_cell_twice(kernel):
    cell = """
        endpoint = create_inference_endpoint("twice", repository=TINY, type="public", env=SMALL)
        endpoint.wait(timeout=180)
        print(id(endpoint), endpoint.url, endpoint.limits["max_total_tokens"])
    """
    # The printed line only: wait() shows a progress bar (display data) only when it has to wait, which
    # depends on the machine's speed.
    first = kernel.run(cell).splitlines()[-1]
    second = kernel.run(cell).splitlines()[-1]  # never "address already in use": the running endpoint comes back
    assert first == second
    changed = kernel.run(cell.replace("env=SMALL", 'env={**SMALL, "MAX_TOTAL_TOKENS": "256"}')).splitlines()[-1]
    assert changed.split()[:2] == first.split()[:2] and changed.split()[2] == "256"  # restarted on its port
    kernel.run("""
        assert ask(endpoint.url).choices[0].message.content
        endpoint.delete()
    """)


def test_two_endpoints_protected_and_public(kernel):
    kernel.run("""
        protected = create_inference_endpoint("prot", repository=TINY, type="protected", token="k", env=SMALL)
        public = create_inference_endpoint("pub", repository=QWEN, type="public", env=SMALL)
        protected.wait(timeout=180)
        public.wait(timeout=180)
        assert protected.url != public.url
        try:
            ask(protected.url, "wrong")
            raise AssertionError("a protected endpoint answered without its token")
        except openai.AuthenticationError:
            pass
        assert ask(protected.url, "k").choices[0].message.content
        assert ask(public.url, "anything").choices[0].message.content
        assert sorted(e.name for e in tgi_nb.list_inference_endpoints()) == ["prot", "pub"]
        protected.delete()
        public.delete()
    """)


def test_process_backend(kernel):
    kernel.run("""
        proc = create_inference_endpoint("proc", repository=TINY, type="protected", token="k", env=SMALL,
                                         backend="process")
        proc.wait(timeout=240)
        assert proc.backend == "process" and proc.status == "running"
        stream = OpenAI(base_url=proc.url + "/v1/", api_key="k", max_retries=0).chat.completions.create(
            model="tgi", messages=MESSAGES, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert proc.client.chat_completion(MESSAGES, max_tokens=4).choices[0].message.content

        proc.pause()
        assert proc.status == "paused" and httpx.get(proc.url + "/health").status_code == 503
        proc.resume().wait(timeout=180)
        proc.scale_to_zero()
        assert proc.status == "scaledToZero"
        assert ask(proc.url, "k").choices[0].message.content
        assert proc.fetch().status == "running"

        child, port = proc._backend.proc, int(proc.url.rsplit(":", 1)[1])
        proc.delete()
        assert child.poll() is not None and not listening(port)
    """)


def test_connect_to_a_server_in_another_process(kernel, models, tmp_path):
    tiny = models[0]
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tgi_nb", "serve", "--model-id", tiny, "--port", str(port), "--api-key", "k",
         "--max-total-tokens", "512", "--max-batch-total-tokens", "4096", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        kernel.run(f"""
            remote = tgi_nb.connect("http://127.0.0.1:{port}/v1/", token="k")
            remote.wait(timeout=240, refresh_every=0.5)
            assert remote.status == "running" and remote.backend == "remote"
            assert remote.url == "http://127.0.0.1:{port}" and remote.repository == TINY
            assert remote.limits["max_total_tokens"] == 512
            assert ask(remote.url, "k").choices[0].message.content
            assert remote.client.chat_completion(MESSAGES, max_tokens=4).choices[0].message.content
            for action in (remote.pause, remote.scale_to_zero):
                try:
                    action()
                    raise AssertionError("a remote endpoint was paused from here")
                except tgi_nb.endpoints.RemoteEndpointError as err:
                    assert "managed where it runs" in str(err)
            assert remote.resume() is remote  # running already: nothing to do
            remote.delete()                   # forgets it; the server keeps running
            assert httpx.get("http://127.0.0.1:{port}/health").status_code == 200
        """)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def test_with_nest_asyncio_applied(tmp_path, models):
    k = Kernel(tmp_path)
    try:
        k.run(setup_code(*models))
        k.run("""
            import asyncio
            import nest_asyncio
            nest_asyncio.apply()

            endpoint = create_inference_endpoint("nested", repository=TINY, type="public", env=SMALL)
            endpoint.wait(timeout=180)
            assert ask(endpoint.url).choices[0].message.content
            out = asyncio.get_event_loop().run_until_complete(
                endpoint.async_client.chat_completion(MESSAGES, max_tokens=4))
            assert out.choices[0].message.content
        """)
        k.run("""
            out = await endpoint.async_client.chat_completion(MESSAGES, max_tokens=4)   # the kernel's own loop
            assert out.choices[0].message.content
            endpoint.scale_to_zero()
            assert ask(endpoint.url).choices[0].message.content
            endpoint.delete()
        """)
    finally:
        k.shutdown()


def test_kernel_shutdown_stops_servers_and_child_processes(tmp_path, models):
    k = Kernel(tmp_path)
    try:
        k.run(setup_code(*models))
        out = k.run("""
            import json
            in_thread = create_inference_endpoint("t", repository=TINY, type="public", env=SMALL)
            in_child = create_inference_endpoint("p", repository=TINY, type="public", env=SMALL, backend="process")
            in_thread.wait(timeout=180)
            in_child.wait(timeout=240)
            print(json.dumps({"ports": [int(e.url.rsplit(":", 1)[1]) for e in (in_thread, in_child)],
                              "pid": in_child._backend.proc.pid, "log": in_child.raw["tgi_nb"]["log_path"]}))
        """)
    finally:
        k.shutdown()
    state = json.loads(out.strip().splitlines()[-1])
    assert wait_until(lambda: process_gone(state["pid"]), timeout=30)
    # Stopped by the kernel's exit handlers (which also remove the child's log folder), not only by the child's
    # watchdog noticing its parent is gone.
    assert not Path(state["log"]).exists()
    for port in state["ports"]:
        assert wait_until(lambda port=port: not listening(port), timeout=30)
