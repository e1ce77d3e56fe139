"""The Batch API on endpoints (create_inference_endpoint, tiny random llama): its lines go through the
endpoint's own wrapper, so a pause holds them (and a line aborted by it runs again) instead of failing them;
the files live in a folder of the endpoint, gone once it is deleted, in a kernel thread and in a child process."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from server_fixtures import wait_until
from tgi_nb import create_inference_endpoint

SMALL_ENV = {"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "4096"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


def lines(count: int, max_tokens: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tgi", "messages": [{"role": "user", "content": f"Story {i}"}],
                                         "max_tokens": max_tokens, "ignore_eos": True}}).encode() + b"\n"
                    for i in range(count))


def run(client: OpenAI, data: bytes):
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_a_pause_holds_the_lines_and_the_files_go_with_the_endpoint(tiny, backend):
    endpoint = create_inference_endpoint(f"batches-{backend}", repository=tiny, type="protected", token="k",
                                         backend=backend, env=dict(SMALL_ENV))
    try:
        endpoint.wait(timeout=180)
        client = OpenAI(base_url=endpoint.url + "/v1/", api_key="k", max_retries=0)
        batch = run(client, lines(6, 48))
        # A child process's files are under its backend's folder, so they go even if the child is killed.
        folder = (endpoint._backend._app.state.files.root if backend == "thread"
                  else endpoint._backend._dir / "files")
        endpoint.pause()     # lines in flight are aborted with the model, the others wait
        endpoint.resume()
        endpoint.wait(timeout=180)
        assert wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=180)
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (6, 0)
        assert (folder / "batches" / f"{batch.id}.json").exists()
    finally:
        endpoint.delete()
    assert not folder.exists()
