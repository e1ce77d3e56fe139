"""schemathesis fuzzing of every route, from the server's own OpenAPI document (bounded and deterministic;
the longer run is ``python tests/api_fuzz.py``, see there for what is checked)."""

from __future__ import annotations

import httpx
import pytest

from api_fuzz import API_KEY, FUZZ_LIMITS, fuzz_route, operations
from server_fixtures import kv_free, make_engine, running_server, wait_until

# A few dozen requests per route keep the whole run near a minute on 2 busy cores; derandomized, they are
# the same requests every run, so the test cannot flake on what hypothesis happens to draw.
EXAMPLES = 20


@pytest.fixture(scope="module")
def fuzz_engine(tiny_model_dir):
    engine = make_engine(tiny_model_dir("llama"), **FUZZ_LIMITS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_engine):
    with running_server(fuzz_engine, api_key=API_KEY) as (server, _):
        yield server


@pytest.mark.parametrize("method, path", operations())
def test_fuzz_route(fuzz_server, fuzz_engine, method, path):
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as http:
        stats = fuzz_route(http, method, path, EXAMPLES)
        print(f"{method} {path}: {stats}")
        # Hypothesis really ran: routes without parameters have only the API-key variants to try.
        assert stats.requests >= (EXAMPLES // 2 if method == "POST" or "{" in path else 3)
        assert path == "/health" or stats.statuses[401]
        # The server still answers a normal request, and nothing holds KV blocks.
        r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
    assert wait_until(lambda: kv_free(fuzz_engine), timeout=60)
