"""Fuzz a running tgi_nb server from its own OpenAPI document with schemathesis (every route, valid and
invalid requests, with the right, a wrong and no API key, streamed and not).

What must hold for every request: no 5xx (nor an error event of the server's own making inside a stream),
no hung connection, every 4xx in the route's error shape (OpenAI's on /v1, TGI's elsewhere); after each
route's run a normal request still answers and every KV block is free again.

The bounded run is tests/test_server_fuzz.py (part of the suite). The longer run is this file as a script:

    PYTHONPATH=$PWD python tests/api_fuzz.py --examples 300      # tiny random model, ~minutes

It prints, per route, how many requests were sent and the status codes seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from schemathesis import GenerationMode

from tgi_nb.server import build_app
from tgi_nb.server.errors import is_openai_path

API_KEY = "fuzz-key"
# Small limits bound every request the fuzzer can make (n=128 x 32 tokens at most) on the tiny model.
FUZZ_LIMITS = dict(max_input_tokens=96, max_total_tokens=128)
_AUTH = {"good": f"Bearer {API_KEY}", "wrong": "Bearer not-the-key", "missing": None}
# Errors the server makes itself (a failed generation) rather than the client's request.
_SERVER_ERROR_TYPES = {"server_error", "incomplete_generation", "generation"}


def openapi_schema() -> "schemathesis.BaseSchema":
    """The server's own OpenAPI document (it does not depend on the model), loaded by schemathesis."""
    return schemathesis.openapi.from_dict(build_app(lambda: None).openapi())


def operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every documented route."""
    return [(op.method.upper(), op.path) for op in (r.ok() for r in openapi_schema().get_all_operations())]


@dataclass
class FuzzStats:
    """What one route's run sent and got back."""

    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    streamed: int = 0


_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")


def _is_error_event(event: Any) -> bool:
    return isinstance(event, dict) and "error" in event


def check_error_shape(path: str, body: Any) -> None:
    """Assert ``body`` is an error in the shape of ``path``'s API (OpenAI's on /v1, TGI's elsewhere)."""
    if is_openai_path(path):
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["param"] is None or isinstance(error["param"], str), error
    else:
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("error_type"), str), body


def check_response(path: str, response: httpx.Response, lines: list[str]) -> bool:
    """Assert the invariants on one (fully read) response; returns whether it was an event stream."""
    status = response.status_code
    assert status < 500, f"{status} from {path}: {response.text[:1000]}"
    if status >= 400:
        check_error_shape(path, response.json())
        return False
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return False
    events = [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]" for line in lines
              if line.startswith("data: ")]
    assert events, f"an empty event stream from {path}"
    errors = [e for e in events if _is_error_event(e)]
    if errors:
        assert len(errors) == 1 and events[-1] is errors[0], f"an error event not at the end: {events[-3:]}"
        check_error_shape(path, errors[0])
        kind = errors[0]["error"]["type"] if is_openai_path(path) else errors[0]["error_type"]
        assert kind not in _SERVER_ERROR_TYPES, f"a server-side failure inside the stream of {path}: {errors[0]}"
    elif path.startswith("/v1/responses"):
        # Typed events, numbered from 0, ending with the response's last state (OpenAI sends no [DONE]).
        assert [e["sequence_number"] for e in events] == list(range(len(events))), events[:3]
        assert events[-1]["type"] in _RESPONSE_ENDS, f"a stream of {path} that ended with {events[-1]['type']}"
        assert events[-1]["type"] != "response.failed" or events[-1]["response"]["error"]["code"] != "server_error", \
            f"a server-side failure inside the stream of {path}: {events[-1]['response']['error']}"
    elif is_openai_path(path):
        assert events[-1] == "[DONE]", f"a stream of {path} that ended without [DONE]: {events[-2:]}"
    return True


def _streamed(case: Any) -> Any:
    """``case`` asking for a stream (where its route can stream), with few tokens, so that a good share of
    the generated requests reach the streaming code rather than stopping at validation."""
    if isinstance(case.body, dict):
        body = {**case.body, "stream": True}
        for name, small in (("max_tokens", 8), ("max_completion_tokens", 8), ("max_output_tokens", 8), ("n", 2),
                            ("best_of", None)):
            if name in body:
                body[name] = small
        if isinstance(body.get("parameters"), dict):
            body["parameters"] = {**body["parameters"], "max_new_tokens": 8, "best_of": None}
        case.body = body
    return case


def _multipart(files: Optional[list]) -> Optional[list]:
    """schemathesis' multipart parts (/v1/files) as httpx can send them: numbers and nulls as JSON text, text
    with lone surrogates as the bytes a client would send."""
    if not files:
        return None

    def text(value: Any) -> Any:
        if isinstance(value, bytes):
            return value
        return (value if isinstance(value, str) else json.dumps(value)).encode("utf-8", "surrogatepass")

    return [(name.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), (part[0], text(part[1]), *part[2:]))
            for name, part in files]


def send(http: httpx.Client, case: Any, auth: Optional[str]) -> tuple[httpx.Response, list[str]]:
    """Send a schemathesis case with httpx, reading the whole body (line by line for event streams)."""
    kwargs = case.as_transport_kwargs(base_url=str(http.base_url).rstrip("/"))
    headers = {k: v for k, v in kwargs.get("headers", {}).items() if k.lower() not in ("authorization",)}
    if auth is not None:
        headers["Authorization"] = auth
    if "json" in kwargs:
        # Escaped JSON, as a browser's JSON.stringify sends it (httpx's own encoder refuses lone surrogates).
        content: Any = json.dumps(kwargs["json"]).encode()
    else:
        content = kwargs.get("data")
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogatepass")
    with http.stream(kwargs["method"], kwargs["url"], params=kwargs.get("params") or None, headers=headers,
                     content=content, files=_multipart(kwargs.get("files")),
                     cookies=kwargs.get("cookies") or None) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response, list(response.iter_lines())
        response.read()
    return response, []


def fuzz_route(http: httpx.Client, method: str, path: str, max_examples: int,
               on_case: Optional[Callable[[httpx.Response], None]] = None) -> FuzzStats:
    """Send ``max_examples`` generated requests (valid and invalid) to one route; deterministic
    (``derandomize``: the same requests every run). Raises AssertionError on the first violation,
    after hypothesis shrank it to a minimal request."""
    op = openapi_schema()[path][method]
    stats = FuzzStats()
    valid = op.as_strategy(GenerationMode.POSITIVE)
    cases = st.one_of(valid, op.as_strategy(GenerationMode.NEGATIVE), valid.map(_streamed))

    def run_with(auths: list[str], examples: int) -> None:
        # The keys are a run of their own: drawn among the cases, a derandomized run could draw only good keys
        # (it did, once the schemas grew), and the 401 checks would test nothing.
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=False,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
        @given(case=cases, auth=st.sampled_from(auths))
        def run(case: Any, auth: str) -> None:
            response, lines = send(http, case, _AUTH[auth])
            stats.requests += 1
            stats.statuses[response.status_code] += 1
            if auth != "good" and path != "/health":
                assert response.status_code == 401, f"{response.status_code} without the right key on {path}"
            stats.streamed += check_response(path, response, lines)
            if on_case is not None:
                on_case(response)

        run()

    bad_keys = max(2, max_examples // 5)
    run_with(["good"], max_examples - bad_keys)
    run_with(["wrong", "missing"], bad_keys)
    return stats


def fuzz_server(base_url: str, max_examples: int, report: Callable[[str], None] = print
                ) -> dict[str, FuzzStats]:
    """Fuzz every route of the server at ``base_url`` (which must use :data:`API_KEY`)."""
    results = {}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for method, path in operations():
            started = time.perf_counter()
            stats = results[f"{method} {path}"] = fuzz_route(http, method, path, max_examples)
            report(f"{method:5} {path:22} {stats.requests:5} requests, {stats.streamed:4} streamed, "
                   f"statuses {dict(sorted(stats.statuses.items()))}, {time.perf_counter() - started:.1f}s")
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """The longer run: a tiny random llama (built here) behind a real server, every route fuzzed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=300, help="generated requests per route")
    args = parser.parse_args(argv)

    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_tiny_model
    from server_fixtures import kv_free, make_engine, running_server, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(build_tiny_model(Path(tmp)), **FUZZ_LIMITS)
        try:
            with running_server(engine, api_key=API_KEY) as (server, _):
                started = time.perf_counter()
                results = fuzz_server(server.url, args.examples)
                total = sum(s.requests for s in results.values())
                headers = {"Authorization": f"Bearer {API_KEY}"}
                ok = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=60, json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).status_code
                free = wait_until(lambda: kv_free(engine), timeout=60)
                print(f"{total} requests over {len(results)} routes in {time.perf_counter() - started:.0f}s: no 5xx, "
                      f"no hung connection, every error in its route's shape; afterwards a chat request -> {ok}, "
                      f"KV blocks all free: {free}")
                return 0 if ok == 200 and free else 1
        finally:
            engine.shutdown()


if __name__ == "__main__":
    sys.exit(main())
