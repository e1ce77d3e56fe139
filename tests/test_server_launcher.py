"""`tgi-nb serve`: text-generation-launcher's flags and environment variables, start-up checks, and the real
command in a child process (health while loading, a chat, Ctrl-C)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tgi_nb.server.launcher import (LaunchError, add_serve_arguments, check_limits, plan_from_options,
                                    resolve_options, run_serve)
from tgi_nb.server.runner import bind_socket


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults():
    opts = resolve_options(parse(), {})
    assert opts["hostname"] == "127.0.0.1" and opts["port"] == 8080
    assert opts["max_concurrent_requests"] == 128 and opts["max_top_n_tokens"] == 5
    assert opts["api_key"] is None and opts["model_id"] is None


def test_environment_variables_and_precedence():
    env = {"MODEL_ID": "some/model", "PORT": "9000", "MAX_INPUT_LENGTH": "1000", "MAX_TOTAL_TOKENS": "2000",
           "MAX_BATCH_PREFILL_TOKENS": "256", "MAX_BATCH_TOTAL_TOKENS": "8000", "MAX_CONCURRENT_REQUESTS": "7",
           "API_KEY": "k", "DTYPE": "float32", "SERVED_MODEL_NAME": "tgi"}
    opts = resolve_options(parse(), env)
    assert (opts["model_id"], opts["port"], opts["max_input_tokens"], opts["max_total_tokens"]) == \
        ("some/model", 9000, 1000, 2000)
    assert (opts["max_batch_prefill_tokens"], opts["max_batch_total_tokens"], opts["max_concurrent_requests"]) == \
        (256, 8000, 7)
    assert (opts["api_key"], opts["dtype"], opts["served_model_name"]) == ("k", "float32", "tgi")
    # The new name wins over the old one; a flag wins over both.
    assert resolve_options(parse(), {"MAX_INPUT_TOKENS": "10", "MAX_INPUT_LENGTH": "20"})["max_input_tokens"] == 10
    assert resolve_options(parse("--max-input-tokens", "30"), {"MAX_INPUT_TOKENS": "10"})["max_input_tokens"] == 30
    assert resolve_options(parse("--port", "1234"), {"PORT": "9000"})["port"] == 1234
    # HOSTNAME is the machine's name in most shells and containers: never a bind address.
    assert resolve_options(parse(), {"HOSTNAME": "buildbox"})["hostname"] == "127.0.0.1"


def test_plan():
    plan = plan_from_options(resolve_options(parse("--max-concurrent-requests", "3", "--api-key", "x",
                                                   "--cors-allow-origin", "http://a, http://b"), {}))
    assert plan.settings.max_concurrent_requests == 3 and plan.settings.api_key == "x"
    assert plan.settings.cors_allow_origins == ["http://a", "http://b"]
    assert plan.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_options(parse("--quantize", "q8_0"), {})["quantize"] == "q8_0"
    assert resolve_options(parse(), {"QUANTIZE": "float"})["quantize"] == "float"
    assert resolve_options(parse("--numerics", "fast"), {})["numerics"] == "fast"


@pytest.mark.parametrize("env,message", [
    ({"MAX_INPUT_TOKENS": "4096", "MAX_TOTAL_TOKENS": "2048"},
     "max_input_tokens (4096) must be < max_total_tokens (2048)"),
    ({"MAX_INPUT_TOKENS": "2048", "MAX_TOTAL_TOKENS": "2048"},
     "max_input_tokens (2048) must be < max_total_tokens (2048)"),
    ({"MAX_TOTAL_TOKENS": "32000", "MAX_BATCH_TOTAL_TOKENS": "16000"},
     "max_total_tokens (32000) must be <= max_batch_total_tokens (16000)"),
    ({"MAX_BATCH_PREFILL_TOKENS": "9000", "MAX_BATCH_TOTAL_TOKENS": "8000"},
     "max_batch_prefill_tokens (9000) must be <= max_batch_total_tokens (8000)"),
    ({"MAX_TOP_N_TOKENS": "50"}, "max_top_n_tokens (50) must be in [0, 20]"),
    ({"PORT": "http"}, "PORT='http': must be an integer"),
    ({"DTYPE": "int8"}, "dtype ('int8') must be one of"),
    ({"QUANTIZE": "awq"}, "quantize ('awq') must be one of float, q8_0, q4_0"),
    ({"NUMERICS": "turbo"}, "numerics ('turbo') must be one of exact, fast"),
])
def test_inconsistent_limits_stop_start_up(env, message, capsys):
    with pytest.raises(LaunchError, match=re.escape(message)):
        check_limits(resolve_options(parse(), env))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert run_serve(parse()) == 2
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert message in capsys.readouterr().err


def test_cookbook_limits_are_consistent():
    # The cookbook's custom_image env: MAX_INPUT_LENGTH 4096, MAX_BATCH_PREFILL_TOKENS 4096,
    # MAX_TOTAL_TOKENS 32000, MAX_BATCH_TOTAL_TOKENS 1024000.
    opts = resolve_options(parse(), {"MAX_INPUT_LENGTH": "4096", "MAX_BATCH_PREFILL_TOKENS": "4096",
                                     "MAX_TOTAL_TOKENS": "32000", "MAX_BATCH_TOTAL_TOKENS": "1024000"})
    check_limits(opts)


def _free_port() -> int:
    sock = bind_socket(port=0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_serve_command(tiny_model_dir):
    port = _free_port()
    env = {**os.environ, "MODEL_ID": str(tiny_model_dir("llama")), "PORT": str(port), "MAX_INPUT_LENGTH": "300",
           "MAX_TOTAL_TOKENS": "400", "API_KEY": "secret", "LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "tgi_nb", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
            if statuses and statuses[-1] == 200:
                break
            time.sleep(0.05)
        assert statuses[-1] == 200 and set(statuses) <= {200, 503}
        headers = {"Authorization": "Bearer secret"}
        info = httpx.get(url + "/info", headers=headers).json()
        assert (info["max_input_tokens"], info["max_total_tokens"]) == (300, 400)
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": "tgi", "messages": [{"role": "user", "content": "Explain TGI in one sentence."}],
                             "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(url + "/v1/models").status_code == 401
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_busy_port_and_failed_load(capsys):
    sock = bind_socket(port=0)
    try:
        port = sock.getsockname()[1]
        assert run_serve(parse("--port", str(port))) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        sock.close()
    done = subprocess.run([sys.executable, "-m", "tgi_nb", "serve", "--model-id", "/no/such/model-dir",
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    assert "the model failed to load" in done.stderr and "/no/such/model-dir" in done.stderr
