"""Memory: a KV cache that is resident only where used, a float16 cache against the float32 one, requests that
cannot fit, blocks freed after completion and aborts, and `tgi-nb serve` sized by an injected cgroup budget."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import socket
import sys

import httpx
import openai
import pytest
import torch
from cgroup_fixtures import GIB, write_fake_system
from openai import OpenAI
from server_fixtures import make_engine, running_server, wait_until

from tgi_nb.engine import SamplingParams, ValidationError
from tgi_nb.engine.capacity import CapacityRequest, ModelShape, kv_budget_bytes, plan_capacity
from tgi_nb.engine.model_runner import allocate_kv_caches


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_kv_cache_pages_become_resident_only_when_written():
    before = _rss()
    caches = allocate_kv_caches(4, (8192, 16, 8, 64), torch.float32, torch.device("cpu"))   # 2 GiB mapped
    mapped = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
    assert mapped == 2 * GIB
    assert _rss() - before < mapped // 8     # nothing written yet: far from 2 GiB resident
    k, v = caches[3]
    k[5].fill_(1.5)
    assert float(k[5].sum()) == 1.5 * 16 * 8 * 64 and float(v[5].abs().sum()) == 0.0 and float(k[6].sum()) == 0.0
    assert _rss() - before < mapped // 8


def test_float16_kv_cache_follows_the_float32_one(tiny_model_dir):
    path = tiny_model_dir("llama")
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=3)
    prompt = list(range(5, 60))
    with make_engine(path, kv_cache_memory=4 << 20) as full, \
            make_engine(path, kv_cache_memory=4 << 20, kv_cache_dtype="float16") as half:
        assert half.runner.kv_caches[0][0].dtype == torch.float16 and half.config.kv_cache_dtype == "float16"
        # the same bytes hold twice the tokens
        assert half.config.max_batch_total_tokens == 2 * full.config.max_batch_total_tokens
        a, b = full.generate_sync(prompt, params).outputs[0], half.generate_sync(prompt, params).outputs[0]
    # the first token's distribution (prefill, then one decode for the second) differs by float16 rounding only
    for x, y in zip(a.logprobs[:2], b.logprobs[:2]):
        assert x.token_id == y.token_id
        assert abs(x.logprob - y.logprob) < 2e-2
        assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


def test_a_request_that_cannot_fit_alone_is_refused_and_blocks_free_after_completion_and_abort(tiny_model_dir):
    with make_engine(tiny_model_dir("llama"), max_batch_total_tokens=512, max_total_tokens=256,
                     max_input_tokens=200) as engine:
        assert engine.block_manager.num_blocks == 32
        with pytest.raises(ValidationError, match="n: 4 samples") as err:   # 4 x 256 tokens > 512
            engine.add_request(list(range(3, 100)), SamplingParams(n=4, max_new_tokens=150))
        assert err.value.field == "n"
        done = engine.generate_sync([list(range(3, 40 + i)) for i in range(6)],
                                    SamplingParams(max_new_tokens=30, ignore_eos=True))
        assert all(r.outputs[0].finish_reason == "length" for r in done)
        assert wait_until(lambda: engine.stats().kv_blocks_used == 0, timeout=30)
        streams = [engine.stream(list(range(3, 50)), SamplingParams(max_new_tokens=200, ignore_eos=True))
                   for _ in range(4)]
        for stream in streams:
            next(stream)
            stream.close()   # aborts the request
        assert wait_until(lambda: engine.stats().num_requests == 0 and engine.stats().kv_blocks_used == 0, 30)


def test_running_out_of_memory_mid_step_is_a_503_and_the_engine_serves_on(tiny_model_dir):
    with make_engine(tiny_model_dir("llama")) as engine, running_server(engine) as (server, _):
        client = OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        real_run = engine.runner.run

        def run_without_memory(step):   # what an allocation failing inside the forward looks like
            engine.runner.run = real_run
            raise MemoryError("cannot allocate 64 MiB")

        engine.runner.run = run_without_memory
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="tgi", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert err.value.status_code == 503 and err.value.code == "out_of_memory"
        assert "out of memory" in err.value.message and err.value.response.headers["retry-after"] == "1"
        reply = client.chat.completions.create(model="tgi", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert wait_until(lambda: engine.stats().kv_blocks_used == 0, timeout=30)


def test_serve_sizes_its_cache_from_an_injected_cgroup_budget_and_serves(tiny_model_dir, tmp_path):
    headroom = 2 << 20   # the tiny model takes 512 bytes per token: room for about 2,900
    cgroup, proc = write_fake_system(tmp_path, version="v1", memory_max=GIB, memory_current=GIB - headroom,
                                     cpu_quota=100000)
    expected = plan_capacity(ModelShape(num_layers=2, num_kv_heads=2, head_dim=16, context=2048),
                             CapacityRequest(max_concurrent_requests=8), kv_budget_bytes(headroom))
    assert expected.max_batch_total_tokens < 8 * 512   # the budget, not the work, decides here
    port = _free_port()
    env = {**os.environ, "MODEL_ID": str(tiny_model_dir("llama")), "PORT": str(port), "MAX_CONCURRENT_REQUESTS": "8",
           "TGI_NB_CGROUP_ROOT": str(cgroup), "TGI_NB_PROC_ROOT": str(proc), "LOG_LEVEL": "info"}
    proc_ = subprocess.Popen([sys.executable, "-m", "tgi_nb", "serve"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _healthy(url) or proc_.poll() is not None, timeout=180), "server did not start"
        assert proc_.poll() is None
        info = httpx.get(url + "/info").json()
        assert info["max_batch_total_tokens"] == expected.max_batch_total_tokens
        assert info["kv_cache_bytes"] == expected.kv_cache_bytes <= 0.7 * headroom
        assert info["num_threads"] == 1   # a 1-CPU quota
        assert any("memory budget" in r for r in info["capacity_reasons"])
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)

        def chat(i: int) -> str:
            reply = client.chat.completions.create(model="tgi", max_tokens=8, messages=[
                {"role": "user", "content": f"Question number {i}: what is a KV cache?"}])
            return reply.choices[0].finish_reason

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert set(pool.map(chat, range(8))) <= {"stop", "length"}
    finally:
        proc_.terminate()
        _, err = proc_.communicate(timeout=60)
    assert "1 threads: the cgroup CPU quota is 1 CPUs" in err
    assert "memory headroom" in err and "cgroup v1 limit 1.0 GiB" in err


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
