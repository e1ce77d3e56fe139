"""create_inference_endpoint / InferenceEndpoint in this process (kernel-thread backend) on a tiny random model:
huggingface_hub's arguments, fields, statuses, methods and errors, limits fitted with warnings, auth, the life
cycle (pause, resume, scale to zero, delete), re-creation, several endpoints, clients and browser URLs.

Kernel-specific behaviour (a real ipykernel, nest_asyncio, the process backend, connect(), kernel shutdown) is
in test_endpoints_kernel.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading
import types
import warnings

import httpx
import openai
import pytest
from cgroup_fixtures import GIB, write_fake_system
from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError
from openai import OpenAI
from server_fixtures import listening, wait_until

import tgi_nb
from tgi_nb.endpoints.spec import utcnow
from tgi_nb.endpoints import (
    EndpointWarning,
    InferenceEndpointNotFoundError,
    create_inference_endpoint,
    get_inference_endpoint,
    list_inference_endpoints,
)

# Small limits: a KV cache of a few MB for the tiny model.
SMALL_ENV = {"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "4096"}
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.fixture
def make(tiny):
    """create_inference_endpoint with the tiny model, public and small by default; deleted after the test."""
    created = []

    def _make(name: str, **kwargs):
        kwargs.setdefault("repository", tiny)
        kwargs.setdefault("type", "public")
        kwargs.setdefault("env", dict(SMALL_ENV))
        endpoint = create_inference_endpoint(name, **kwargs)
        created.append(endpoint)
        return endpoint

    yield _make
    for endpoint in created:
        endpoint.delete()


def chat(url: str, key: str = "-", **kwargs) -> str:
    client = OpenAI(base_url=url + "/v1/", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, **kwargs)
    return reply.choices[0].message.content


def test_cookbook_call_is_accepted_and_limits_are_lowered_with_warnings(tiny, monkeypatch, tmp_path):
    # A container with 24 MiB of headroom: the KV cache may take 70% of it, about 16.8 MiB, so that
    # MAX_BATCH_TOTAL_TOKENS is too large for memory too.
    cgroup, proc = write_fake_system(tmp_path, version="v2", memory_max=GIB, memory_current=GIB - (24 << 20))
    monkeypatch.setenv("TGI_NB_CGROUP_ROOT", str(cgroup))
    monkeypatch.setenv("TGI_NB_PROC_ROOT", str(proc))
    endpoint = create_inference_endpoint(
        "cookbook",
        repository=tiny,
        framework="pytorch",
        task="text-generation",
        accelerator="gpu",
        vendor="aws",
        region="us-east-1",
        type="protected",
        instance_type="p4de",
        instance_size="2xlarge",
        custom_image={
            "health_route": "/health",
            "env": {
                "MAX_INPUT_LENGTH": "4096",
                "MAX_BATCH_PREFILL_TOKENS": "4096",
                "MAX_TOTAL_TOKENS": "32000",
                "MAX_BATCH_TOTAL_TOKENS": "1024000",
                "MODEL_ID": "/repository",
            },
            "url": "ghcr.io/huggingface/text-generation-inference:sha-1734540",
        },
        token="hf_secret",
    )
    try:
        # Returned before the model loaded: huggingface_hub's early statuses, no URL yet.
        assert endpoint.status in ("pending", "initializing")
        assert endpoint.url is None
        with pytest.warns(EndpointWarning) as caught:
            assert endpoint.wait(timeout=300) is endpoint
        messages = " | ".join(str(w.message) for w in caught)
        assert "MAX_TOTAL_TOKENS=32000" in messages and "lowered to 2048" in messages
        assert "MAX_INPUT_LENGTH=4096" in messages and "lowered to 2047" in messages
        assert "MAX_BATCH_TOTAL_TOKENS=1024000" in messages
        import torch

        if not torch.cuda.is_available():
            assert "accelerator='gpu'" in messages and "CPU" in messages

        assert endpoint.status == "running"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", endpoint.url)
        info = httpx.get(endpoint.url + "/info", headers={"Authorization": "Bearer hf_secret"}).json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (2047, 2048)
        assert info["max_batch_total_tokens"] < 1024000
        assert info["kv_cache_bytes"] <= 0.7 * (24 << 20) and info["weights_bytes"] > 0
        assert any("memory budget" in reason for reason in info["capacity_reasons"])
        assert endpoint.limits["max_total_tokens"] == 2048

        # huggingface_hub's fields; cloud-only arguments recorded, not acted on.
        assert (endpoint.name, endpoint.namespace, endpoint.repository) == ("cookbook", "local", tiny)
        assert (endpoint.framework, endpoint.task, endpoint.type, endpoint.health_route) == (
            "pytorch", "text-generation", "protected", "/health")
        assert endpoint.raw["provider"] == {"vendor": "aws", "region": "us-east-1"}
        assert endpoint.raw["compute"]["instanceType"] == "p4de"
        assert endpoint.raw["model"]["image"]["url"].startswith("ghcr.io/")
        assert endpoint.created_at <= endpoint.updated_at
        assert "url='http://127.0.0.1:" in repr(endpoint) and "status='running'" in repr(endpoint)
        assert chat(endpoint.url, "hf_secret")
        # Each warning is shown once, not on every fetch.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            endpoint.fetch()
    finally:
        endpoint.delete()


def test_protected_endpoint_requires_the_token_and_public_does_not(make, monkeypatch):
    protected = make("protected", type="protected", token="hf_right")
    public = make("public")
    protected.wait(timeout=120)
    public.wait(timeout=120)
    with pytest.raises(openai.AuthenticationError):
        chat(protected.url, "hf_wrong")
    assert chat(protected.url, "hf_right")
    assert httpx.get(protected.url + "/health").status_code == 200  # health checks need no token
    assert chat(public.url, "anything")
    assert httpx.get(public.url + "/v1/models").status_code == 200

    assert public.token is None


def test_protected_without_a_token_gets_a_random_one_not_the_hub_token(make, monkeypatch, capsys):
    """Whoever is given a local endpoint's password must not hold the user's Hugging Face credential; the
    cookbook's own client (``api_key=HF_API_KEY``) still works on this machine, where the Hub token never leaves
    loopback, and the server keeps only its digest."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    endpoint = make("random-token", type="authenticated")
    token = endpoint.token
    assert token.startswith("tgi-nb-") and len(token) > 30 and "hf_from_env" not in repr(endpoint.raw)
    out = capsys.readouterr().out
    assert out.count(token) == 1 and "Hugging Face token works too" in out   # shown once
    launch = endpoint._backend.launch
    assert "hf_from_env" not in repr(launch) + str(launch.accepted_key_digests)
    endpoint.wait(timeout=120)
    assert chat(endpoint.url, token)
    assert chat(endpoint.url, "hf_from_env")                         # the cookbook's api_key=HF_API_KEY
    with pytest.raises(openai.AuthenticationError):
        chat(endpoint.url, "hf_not_it")
    url = endpoint.url
    again = make("random-token", type="authenticated")               # the cell run again: same token, same server
    assert again is endpoint and again.token == token and again.url == url and token not in capsys.readouterr().out
    assert chat(endpoint.url, token)
    explicit = make("hub-token-asked-for", type="authenticated", token=True)   # huggingface_hub's, when asked
    assert explicit.token == "hf_from_env"


def test_the_hub_token_is_not_accepted_off_loopback(make, monkeypatch, capsys):
    """On an endpoint listening beyond this machine a client would send the Hub token over plain HTTP: only the
    random token opens it there."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    endpoint = make("all-interfaces", type="protected", host="0.0.0.0")
    assert "Hugging Face token works too" not in capsys.readouterr().out
    endpoint.wait(timeout=120)
    assert chat(endpoint.url, endpoint.token)
    with pytest.raises(openai.AuthenticationError):
        chat(endpoint.url, "hf_from_env")


def test_protected_without_any_token_is_refused_at_once(tiny, monkeypatch):
    with pytest.raises(ValueError, match="token"):
        create_inference_endpoint("no-token", repository=tiny, type="protected", token=False)
    assert "no-token" not in [e.name for e in list_inference_endpoints()]


def test_tokens_stay_out_of_reprs():
    from tgi_nb.endpoints.spec import build_request
    from tgi_nb.server import ServerSettings

    request = build_request("masked", repository="org/model", type="protected", token="s3cret-token")
    settings = ServerSettings(api_key="s3cret-key")
    for shown in (repr(request), repr(request.launch), repr(settings), str(settings)):
        assert "s3cret" not in shown, shown
    assert request.launch.api_key == "s3cret-token" and settings.api_key == "s3cret-key"


def test_life_cycle_pause_resume_scale_to_zero_delete(make):
    endpoint = make("life", type="protected", token="k")
    endpoint.wait(timeout=120)
    client = OpenAI(base_url=endpoint.url + "/v1/", api_key="k", max_retries=0)
    stream = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    url, port = endpoint.url, int(endpoint.url.rsplit(":", 1)[1])

    assert endpoint.pause() is endpoint and endpoint.status == "paused"
    with pytest.raises(openai.InternalServerError) as err:
        chat(url, "k")
    assert err.value.status_code == 503 and err.value.body["code"] == "endpoint_paused"
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "paused"
    with pytest.raises(InferenceEndpointError, match="paused"):
        endpoint.wait(timeout=5)

    assert endpoint.resume() is endpoint and endpoint.status in ("initializing", "running")
    endpoint.wait(timeout=120)
    assert endpoint.url == url  # same port: clients made before the pause keep working
    assert chat(url, "k")
    with pytest.raises(InferenceEndpointError, match="already running"):
        endpoint.resume(running_ok=False)
    assert endpoint.resume() is endpoint  # running_ok=True: nothing to do

    assert endpoint.scale_to_zero() is endpoint and endpoint.status == "scaledToZero"
    assert endpoint.url == url
    assert httpx.get(url + "/health").status_code == 503
    assert chat(url, "k")  # the request wakes the model and waits for it
    assert endpoint.fetch().status == "running"

    endpoint.delete()
    assert endpoint.status == "deleted" and endpoint.url is None
    assert not listening(port)
    with pytest.raises(InferenceEndpointError, match="deleted"):
        endpoint.fetch()
    with socket.socket() as s:  # free for the next server (which binds with SO_REUSEADDR, as ours does)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_same_name_gives_back_the_running_endpoint_or_restarts_it_on_its_port(make):
    first = make("again")
    first.wait(timeout=120)
    backend = first._backend
    second = make("again")
    assert second is first and second._backend is backend and second.status == "running"

    # Cloud-only changes are recorded without a restart.
    third = make("again", region="eu-west-1")
    assert third is first and third._backend is backend and third.raw["provider"]["region"] == "eu-west-1"

    # A change to what is served restarts it, on the same port.
    url = first.url
    changed = make("again", env={**SMALL_ENV, "MAX_TOTAL_TOKENS": "256"})
    assert changed is first and changed._backend is not backend
    changed.wait(timeout=120)
    assert changed.url == url and changed.limits["max_total_tokens"] == 256
    assert chat(url)


def test_update_changes_the_server_in_place(make):
    endpoint = make("upd")
    endpoint.wait(timeout=120)
    url = endpoint.url
    assert endpoint.update(instance_size="x4") is endpoint and endpoint.raw["compute"]["instanceSize"] == "x4"
    endpoint.update(env={"MAX_TOTAL_TOKENS": "300", "MAX_BATCH_TOTAL_TOKENS": "4096"}).wait(timeout=120)
    assert endpoint.limits["max_total_tokens"] == 300 and endpoint.url == url


def test_two_endpoints_at_once(make, tiny_model_dir):
    a = make("two-a")
    b = make("two-b", repository=str(tiny_model_dir("qwen3")))
    a.wait(timeout=120)
    b.wait(timeout=120)
    assert a.url != b.url
    assert chat(a.url) and chat(b.url)
    models = {httpx.get(e.url + "/v1/models").json()["data"][0]["id"] for e in (a, b)}
    assert len(models) == 2
    assert {"two-a", "two-b"} <= {e.name for e in list_inference_endpoints()}


def test_env_model_id_and_container_args(make, tiny, tiny_model_dir):
    qwen = str(tiny_model_dir("qwen3"))
    # MODEL_ID other than "/repository" is what is served; a container flag wins over its variable.
    endpoint = make("flags", repository=tiny, env={**SMALL_ENV, "MODEL_ID": qwen},
                    container_args=["--max-total-tokens", "200"])
    endpoint.wait(timeout=120)
    info = httpx.get(endpoint.url + "/info").json()
    assert info["model_id"] == qwen and info["max_total_tokens"] == 200
    assert endpoint.repository == tiny


def test_env_quantize_and_numerics_reach_the_engine(make):
    endpoint = make("fast", env={**SMALL_ENV, "QUANTIZE": "q8_0", "NUMERICS": "fast"})
    endpoint.wait(timeout=120)
    info = httpx.get(endpoint.url + "/info").json()
    assert info["numerics"] == "fast" and "q8_0" in info["weight_formats"]
    assert chat(endpoint.url)


def test_failures_and_timeouts_raise_huggingface_hub_errors(make, tmp_path):
    missing = make("missing", repository=str(tmp_path / "no-such-model"))
    with pytest.raises(InferenceEndpointError, match="no-such-model"):
        missing.wait(timeout=120)
    assert missing.status == "failed" and missing.raw["status"]["message"]

    bad_env = make("bad-env", env={"MAX_TOTAL_TOKENS": "many"})
    with pytest.raises(InferenceEndpointError, match="MAX_TOTAL_TOKENS"):
        bad_env.wait(timeout=60)

    slow = make("slow")
    with pytest.raises(InferenceEndpointTimeoutError) as err:
        slow.wait(timeout=0)
    assert isinstance(err.value, TimeoutError)
    with pytest.raises(ValueError):
        slow.wait(timeout=-1)
    with pytest.raises(ValueError):
        slow.wait(refresh_every=0)


def test_invalid_arguments_name_the_allowed_values(tiny):
    with pytest.raises(ValueError, match="type: must be one of public, authenticated, protected, private"):
        create_inference_endpoint("bad", repository=tiny, type="secret")
    with pytest.raises(ValueError, match="task"):
        create_inference_endpoint("bad", repository=tiny, type="public", task="text-to-image")
    with pytest.raises(ValueError, match="backend: must be one of thread, process"):
        create_inference_endpoint("bad", repository=tiny, type="public", backend="docker")
    with pytest.raises(ValueError, match="name"):
        create_inference_endpoint("", repository=tiny, type="public")


def test_get_and_list(make):
    endpoint = make("findme")
    assert get_inference_endpoint("findme") is endpoint
    assert endpoint in list_inference_endpoints()
    with pytest.raises(InferenceEndpointNotFoundError, match="findme"):
        get_inference_endpoint("nope")
    assert issubclass(InferenceEndpointNotFoundError, InferenceEndpointError)
    # The top-level package exports them lazily.
    assert tgi_nb.create_inference_endpoint is create_inference_endpoint
    assert tgi_nb.get_inference_endpoint is get_inference_endpoint
    assert tgi_nb.InferenceEndpoint is type(endpoint)


def test_huggingface_hub_clients_work_offline(make):
    from huggingface_hub import constants

    assert constants.is_offline_mode()  # conftest: HF_HUB_OFFLINE=1, which blocks even 127.0.0.1 by default
    endpoint = make("clients", type="protected", token="k")
    with pytest.raises(InferenceEndpointError, match="not yet deployed"):
        _ = endpoint.client
    endpoint.wait(timeout=120)
    out = endpoint.client.chat_completion(MESSAGES, max_tokens=4)
    assert out.choices[0].message.content
    assert endpoint.client.text_generation("Hello", max_new_tokens=3)

    async def run():
        return await endpoint.async_client.chat_completion(MESSAGES, max_tokens=4)

    assert asyncio.run(run()).choices[0].message.content


def test_scale_to_zero_after_idle_minutes(make):
    # HF's autoscaling: min_replica=0 and scale_to_zero_timeout (minutes) free an idle model.
    # 3 s idle: long enough for wait() to see it running on a loaded machine (the clock starts once it is ready).
    endpoint = make("idle", min_replica=0, scale_to_zero_timeout=0.05)
    endpoint.wait(timeout=120)
    assert chat(endpoint.url)
    assert wait_until(lambda: endpoint.fetch().status == "scaledToZero", timeout=30)
    assert chat(endpoint.url)
    assert endpoint.fetch().status in ("running", "scaledToZero")


def test_browser_url(make, monkeypatch):
    from tgi_nb.endpoints import browser

    endpoint = make("browser")
    endpoint.wait(timeout=120)
    port = endpoint.url.rsplit(":", 1)[1]
    monkeypatch.delenv("TGI_NB_BROWSER_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    assert endpoint.browser_url == endpoint.url  # JupyterLab on this machine

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")  # Binder, JupyterHub: jupyter-server-proxy
    assert endpoint.browser_url == f"/user/ada/proxy/{port}"

    monkeypatch.setenv("TGI_NB_BROWSER_URL", "https://lab.example.org/proxy/{port}/")
    assert endpoint.browser_url == f"https://lab.example.org/proxy/{port}"
    monkeypatch.delenv("TGI_NB_BROWSER_URL")
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX")

    # Colab: the URL google.colab.kernel.proxyPort gives.
    calls = []
    output = types.ModuleType("google.colab.output")
    output.eval_js = lambda js: calls.append(js) or f"https://{port}-abc.colab.googleusercontent.com/"
    colab = types.ModuleType("google.colab")
    colab.output = output
    google = types.ModuleType("google")
    google.colab = colab
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    browser._colab_url.cache_clear()
    try:
        assert endpoint.browser_url == f"https://{port}-abc.colab.googleusercontent.com"
        assert calls == [f"google.colab.kernel.proxyPort({port})"]
    finally:
        browser._colab_url.cache_clear()


def test_launcher_settings_from_every_form_of_custom_image_and_env():
    from huggingface_hub import InferenceEndpointType

    from tgi_nb.endpoints.spec import build_request

    def env_of(**kwargs):
        return build_request("x", repository="org/model", type="public", **kwargs).launch.env_dict

    assert env_of(custom_image={"env": {"MAX_TOTAL_TOKENS": "2048"}}) == {"MAX_TOTAL_TOKENS": "2048"}
    assert env_of(custom_image={"url": "ghcr.io/tgi", "health_route": "/health",
                                "env": {"MAX_INPUT_LENGTH": "100"}}) == {"MAX_INPUT_LENGTH": "100"}
    # huggingface_hub's TGI variant, camelCase keys.
    assert env_of(custom_image={"tgi": {"url": "ghcr.io/tgi", "maxTotalTokens": 1024, "maxInputLength": 512}}) == {
        "MAX_TOTAL_TOKENS": "1024", "MAX_INPUT_LENGTH": "512"}
    # env= (huggingface_hub's own argument) wins over the image's env.
    assert env_of(custom_image={"env": {"MAX_TOTAL_TOKENS": "2048"}}, env={"MAX_TOTAL_TOKENS": 4096}) == {
        "MAX_TOTAL_TOKENS": "4096"}

    req = build_request("x", repository="org/model", custom_image={"env": {"MODEL_ID": "/repository"}},
                        type=InferenceEndpointType.AUTHENTICATED, token="t", secrets={"MY_KEY": "s3cret"})
    assert (req.launch.model_id, req.launch.api_key, req.type) == ("org/model", "t", "authenticated")
    raw = req.raw(state="pending", url=None, message=None, created_at=utcnow(), updated_at=utcnow())
    assert raw["model"]["secrets"] == {"MY_KEY": "********"} and "s3cret" not in str(raw)
    other = build_request("x", repository="org/model", type="public", env={"MODEL_ID": "other/model"})
    assert other.launch.model_id == "other/model"
    # Scale to zero after idle minutes only with min_replica=0, as on Hugging Face.
    always_on = build_request("x", repository="m", type="public", scale_to_zero_timeout=15)
    assert always_on.launch.scale_to_zero_after is None
    assert build_request("x", repository="m", type="public", min_replica=0,
                         scale_to_zero_timeout=15).launch.scale_to_zero_after == 900



def test_status_changes_reach_subscribers_from_a_background_thread(make, caplog):
    endpoint = make("watched")
    endpoint.wait(timeout=120)
    seen: list[tuple[str, str, str]] = []

    def broken(e, old, new):
        raise RuntimeError("a widget's bug")

    endpoint.on_status_change(broken)  # logged; the other subscribers still hear every change
    unsubscribe = endpoint.on_status_change(
        lambda e, old, new: seen.append((old, new, threading.current_thread().name)) if e is endpoint else None)
    endpoint.pause()
    endpoint.resume().wait(timeout=120)
    endpoint.scale_to_zero()
    assert chat(endpoint.url)  # the request wakes the model; the background check sees it run again
    assert wait_until(lambda: seen and seen[-1][1] == "running", timeout=60)
    news = [new for _, new, _ in seen]
    assert news[:4] == ["paused", "initializing", "running", "scaledToZero"]
    assert {thread for _, _, thread in seen} == {"tgi_nb-endpoint-status"}
    assert "a widget's bug" in caplog.text

    unsubscribe()
    before = len(seen)
    endpoint.pause()
    assert endpoint._machine.flush() and len(seen) == before


def test_status_is_pushed_by_the_controller_and_survives_a_restart(make):
    """A kernel-thread endpoint's machine is the controller's: changes reach subscribers without any thread
    polling it, and the server restarted by update() drives the same machine."""
    endpoint = make("pushed")
    machine, backend = endpoint._machine, endpoint._backend
    seen: list[str] = []
    unsubscribe = endpoint.on_status_change(lambda e, old, new: seen.append(new))
    endpoint.wait(timeout=120)
    assert backend.pushes and backend._app.controller.machine is machine
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tgi_nb-watch-")]
    endpoint.update(env={**SMALL_ENV, "MAX_TOTAL_TOKENS": "256"}).wait(timeout=120)
    assert endpoint._backend is not backend and endpoint._machine is machine
    assert machine.flush() and seen[-3:] == ["running", "initializing", "running"]
    unsubscribe()


def test_a_child_process_pushes_its_status_too(make):
    """A process endpoint's child changes status by itself (idle scale to zero, a request waking it): the change
    reaches a subscriber through the relay's long poll, which the child answers when its status changes; no
    thread checks it every so often, and an action's own answer is never undone by an older one."""
    endpoint = make("child-pushes", backend="process", min_replica=0, scale_to_zero_timeout=0.05)
    backend = endpoint._backend
    seen: list[str] = []
    scaled, woken = threading.Event(), threading.Event()

    def changed(_endpoint, _old, new):
        seen.append(new)
        if new == "scaledToZero":
            scaled.set()
        elif new == "running" and scaled.is_set():
            woken.set()

    unsubscribe = endpoint.on_status_change(changed)
    endpoint.wait(timeout=240)
    assert backend.pushes
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tgi_nb-watch-")]
    # Whatever the machine's load, in this order: 3 s idle in the child scale it to zero (told to the subscriber,
    # nobody calling fetch() or state()), and a request wakes it (initializing, then running, told too).
    assert scaled.wait(120), seen
    assert chat(endpoint.url)
    assert woken.wait(120), seen
    endpoint.pause()
    assert endpoint.status == "paused"  # the action's answer, at once
    stale = {"status": "running", "message": None, "changed_at": float("-inf")}
    backend._apply(stale)  # an answer older than the pause's arriving late changes nothing
    assert endpoint.status == "paused"
    unsubscribe()


def test_the_life_cycle_takes_only_listed_transitions():
    from tgi_nb.endpoints.status import TRANSITIONS, InvalidTransition, StatusMachine

    machine = StatusMachine()
    for status in ("initializing", "running", "scaledToZero", "initializing", "running", "paused", "initializing",
                   "failed", "initializing"):
        assert machine.move(status)
    with pytest.raises(InvalidTransition, match="initializing -> pending"):
        machine.move("pending")
    with pytest.raises(ValueError, match="status: must be one of pending, initializing"):
        machine.move("sleeping")
    assert machine.observe("pending") and machine.status == "pending"  # a remote server seen restarting
    assert set(TRANSITIONS) == {s.value for s in tgi_nb.endpoints.InferenceEndpointStatus} | {"deleted"}


def test_paused_while_loading_is_freed_once_loaded_and_resumes(make):
    endpoint = make("pause-early")
    endpoint.pause()  # the model is still loading: it is freed as soon as it is loaded
    assert endpoint.status == "paused"
    holder = endpoint._backend._app.controller.holder
    assert wait_until(lambda: holder.status == "idle" and holder.engine is None, timeout=120)
    assert httpx.get(endpoint._backend.server_url + "/health").json()["status"] == "paused"
    endpoint.resume().wait(timeout=120)
    assert endpoint.status == "running" and chat(endpoint.url)


def test_a_check_never_writes_a_stale_status_over_a_pushed_one():
    """A pushed machine's controller is its one writer. A check that read "initializing" just before the model
    finished loading must not write it back over "running" (the workbench then showed initializing for ever);
    a dead server thread, which only a check can find, is still recorded."""
    from tgi_nb.endpoints.backends import Backend, BackendState

    class Pushed(Backend):
        watch_every = None   # as the thread backend: the controller pushes every change

        def _check(self) -> BackendState:
            seen = BackendState(self.machine.status)
            self.machine.move(self.next_status)   # the controller moves between the read and the record
            return seen

    backend = Pushed("stale-check", None)
    backend.machine.move("initializing")
    backend.next_status = "running"
    assert backend.state().status == "initializing" and backend.machine.status == "running"

    class Died(Pushed):
        def _check(self) -> BackendState:
            return BackendState("failed", "the server thread stopped")

    died = Died("dead-thread", None)
    died.machine.move("initializing")
    died.state()
    assert died.machine.status == "failed"
