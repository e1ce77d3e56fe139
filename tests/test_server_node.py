"""The official openai npm package, run by Node against a real server: the guide's Node example (plain JS),
the cookbook's streaming example, the ``chat.completions.stream()`` helper, error classes, and the
Responses API with its ``responses.stream()`` helper.

tests/node/node_modules is installed by ``npm ci`` (the Makefile's test-deps target); when it is missing
and npm is available the first test installs it, so the suite also runs from a bare checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from server_fixtures import running_server
from server_fixtures import engine  # noqa: F401  (module-scoped fixtures)

NODE_DIR = Path(__file__).parent / "node"
API_KEY = "node-key"


def _node_ready() -> bool:
    return (NODE_DIR / "node_modules" / "openai" / "package.json").is_file()


@pytest.fixture(scope="module")
def node_modules():
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not _node_ready():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed and tests/node/node_modules is missing")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True,
                       timeout=300)
    assert _node_ready()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, api_key=API_KEY) as (server, _):
        yield server


def run_node(script: str, server, **env) -> str:
    environment = {**os.environ, "BASE_URL": server.url, "API_KEY": API_KEY, **{k: str(v) for k, v in env.items()}}
    done = subprocess.run(["node", script], cwd=NODE_DIR, env=environment, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_guide_example_non_streaming(node_modules, server):
    # The guide's baseURL has no trailing slash and includes /v1.
    completion = json.loads(run_node("chat.mjs", server, BASE_URL=server.url + "/v1", MAX_TOKENS=8))
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"]
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"]["completion_tokens"] == 8


def test_cookbook_streaming_example(node_modules, server):
    streamed = run_node("stream.mjs", server, MAX_TOKENS=8)
    import openai

    expected = openai.OpenAI(base_url=server.url + "/v1/", api_key=API_KEY).chat.completions.create(
        model="tgi", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Why is open-source software important?"}]).choices[0].message.content
    assert streamed == expected


def test_stream_helper(node_modules, server):
    result = json.loads(run_node("helper.mjs", server, MAX_TOKENS=6))
    completion = result["completion"]
    choices = completion["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice in choices:
        # The accumulator concatenates repeated strings: a role sent twice would read "assistantassistant".
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] == "length"
    assert choices[0]["message"]["content"] == choices[1]["message"]["content"]  # greedy
    assert completion["usage"]["completion_tokens"] == 12
    # Deltas of the two choices interleave; together they hold both texts.
    assert sorted("".join(result["deltas"])) == sorted(choices[0]["message"]["content"] * 2)


def test_error_classes(node_modules, server):
    results = json.loads(run_node("errors.mjs", server))
    assert results["bad_request"] == {"class": "BadRequestError", "status": 400, "param": "temperature",
                                      "code": None}
    assert results["not_found"]["class"] == "NotFoundError" and results["not_found"]["code"] == "model_not_found"
    assert results["unauthorized"]["class"] == "AuthenticationError"
    assert results["unauthorized"]["code"] == "invalid_api_key"


def test_embeddings(node_modules, server):
    import numpy as np
    import openai

    result = json.loads(run_node("embeddings.mjs", server))
    expected = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY).embeddings.create(
        model="m", input=["The Eiffel Tower is in Paris.", "A short one."], encoding_format="float")
    expected = np.array([d.embedding for d in expected.data])
    for key in ("asDefault", "asFloat"):  # the package asks for base64 by default and decodes it
        assert [d["index"] for d in result[key]["data"]] == [0, 1]
        np.testing.assert_allclose(np.array([d["embedding"] for d in result[key]["data"]]), expected, atol=1e-6)
    assert result["asFloat"]["usage"]["prompt_tokens"] > 0
    assert result["dimensionsError"] == {"class": "BadRequestError", "status": 400, "param": "dimensions"}


def test_responses_create_and_stream_helper(node_modules, server):
    result = json.loads(run_node("responses.mjs", server))
    created, final = result["created"], result["final"]
    assert created["status"] == "incomplete" and created["output_text"]
    types = [e["type"] for e in result["events"]]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert [e["sequence_number"] for e in result["events"]] == list(range(len(types)))
    assert final["status"] == "completed" and final["previous_response_id"] == created["id"]
    assert json.loads(final["output_text"])["answer"] in ("yes", "no")
    assert result["notFound"] == {"status": 404, "name": "NotFoundError"}
