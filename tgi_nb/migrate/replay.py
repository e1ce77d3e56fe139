"""Replaying a workload against targets, through the official ``openai`` client, and checking each answer.

Each request is sent as it was recorded (the body as is, through ``client.post``, so that no SDK signature
drops or renames a field), with the target's overrides. A 400 that names a parameter the request carries is
a refusal: the parameter is noted, removed, and the request sent again, so that the rest of it is still
compared. Parameters a target ignores are found two ways: those its OpenAPI document does not declare (tgi_nb,
TGI and vLLM publish one), and those the answer shows were not honoured (see
:func:`~tgi_nb.migrate.checks.ignored_parameters`).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Optional

import httpx

from . import checks
from .report import Outcome, Report
from .targets import ReplayTarget, resolve_targets
from .workload import WorkItem, Workload

# How many refused parameters a request drops before it counts as failed.
MAX_REFUSED = 3


def _declared_fields(target: ReplayTarget, client: Any) -> dict[str, set[str]]:
    """Route -> request fields the target's OpenAPI document declares; empty when it publishes none."""
    base = (target.base_url or "").rstrip("/")
    root = base[:-len("/v1")] if base.endswith("/v1") else base
    try:
        response = httpx.get(root + "/openapi.json", headers={"Authorization": f"Bearer {client.api_key}"},
                             timeout=10)
        doc = response.json() if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}
    schemas = (doc.get("components") or {}).get("schemas") or {}
    declared = {}
    for route, methods in (doc.get("paths") or {}).items():
        body = ((methods.get("post") or {}).get("requestBody") or {}).get("content", {}).get("application/json", {})
        ref = (body.get("schema") or {}).get("$ref", "")
        properties = (schemas.get(ref.rsplit("/", 1)[-1]) or {}).get("properties")
        if properties:
            declared[route] = set(properties)
    return declared


def _error_of(body: Any) -> tuple[Optional[str], Optional[str]]:
    """(message, param) of an OpenAI error body (the SDK hands over the inner ``error`` object)."""
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        return str(inner.get("message") or body), inner.get("param")
    return (str(body) if body is not None else None), None


class Replay:
    """A replay of ``workload`` on ``targets``; :meth:`run` blocks, :meth:`stop` ends it early (from any thread).

    ``done`` / ``total`` tell the progress; ``on_outcome(outcome)`` (from a worker thread) sees each result.
    ``similarity_with``: the target whose /v1/embeddings scores similarity (default: the first target that is
    not OpenAI itself; False: none).

    Example:
        >>> replay = Replay("workload.jsonl", [endpoint, (endpoint, {"temperature": 0.7})])   # doctest: +SKIP
        >>> report = replay.run()                                                            # doctest: +SKIP
    """

    def __init__(self, workload: Any, targets: Any, *, concurrency: int = 4, similarity_with: Any = None,
                 retry_refused: bool = True, timeout: float = 600.0):
        if concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, got {concurrency}")
        self.workload = Workload.of(workload)
        self.targets = resolve_targets(targets)
        self.concurrency = concurrency
        self.retry_refused = retry_refused
        self.timeout = timeout
        self.similarity_with = similarity_with
        self.total = len(self.workload) * len(self.targets)
        self.done = 0
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        """Send no more requests; those in flight finish, and :meth:`run` reports what was done."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run(self, on_outcome: Optional[Callable[[Outcome], None]] = None) -> Report:
        """Send every request to every target and return the :class:`~tgi_nb.migrate.report.Report`."""
        clients = {t.label: t.client(self.timeout) for t in self.targets}
        declared = {t.label: _declared_fields(t, clients[t.label]) for t in self.targets}
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="tgi_nb-replay") as pool:
            # Requests interleave targets, so that every target sees the same load over time.
            futures = [pool.submit(self._send, t, clients[t.label], declared[t.label], item)
                       for item in self.workload for t in self.targets]
            for future in as_completed(futures):
                outcome = future.result()
                if outcome is None:
                    continue
                with self._lock:
                    self.outcomes.append(outcome)
                    self.done += 1
                if on_outcome is not None:
                    on_outcome(outcome)
        order = {(item.custom_id, t.label): i for i, (item, t) in
                 enumerate((item, t) for item in self.workload for t in self.targets)}
        outcomes = sorted(self.outcomes, key=lambda o: order[(o.custom_id, o.target)])
        report = Report(self.workload, [t.label for t in self.targets], outcomes)
        scorer = self._similarity_target()
        if scorer is not None:
            report.add_similarity(clients.get(scorer.label) or scorer.client(self.timeout))
        return report

    def _similarity_target(self) -> Optional[ReplayTarget]:
        if self.similarity_with is False:
            return None
        if self.similarity_with is not None:
            return ReplayTarget.of(self.similarity_with)
        return next((t for t in self.targets if not t.is_openai), None)

    def _send(self, target: ReplayTarget, client: Any, declared: dict[str, set[str]], item: WorkItem
              ) -> Optional[Outcome]:
        if self._stop.is_set():
            return None
        import openai

        body = target.body(item.url, item.body)
        refused: list[str] = []
        while True:
            started = time.perf_counter()
            error = param = None
            try:
                raw = client.post(item.url[len("/v1"):], body=body, cast_to=httpx.Response)
                status, response = raw.status_code, raw.json()
            except openai.APIStatusError as exc:
                status, response = exc.status_code, exc.body
                error, param = _error_of(exc.body)
            except (openai.APIConnectionError, ValueError) as exc:
                status, response, error = None, None, f"{type(exc).__name__}: {exc}"
            latency = time.perf_counter() - started
            key = (param or "").split(".")[0].split("[")[0]
            if not (self.retry_refused and status == 400 and key in body and key not in ("model", "messages",
                                                                                             "prompt", "input")
                    and len(refused) < MAX_REFUSED):
                break
            refused.append(key)
            body = {k: v for k, v in body.items() if k != key}
        undeclared = sorted(set(body) - declared[item.url]) if item.url in declared else []
        outcome = Outcome(item.custom_id, target.label, item.url, status, error=error, refused=refused,
                          latency=latency, request=body, response=response)
        if outcome.ok:
            outcome.text = checks.answer_text(item.url, response)
            outcome.finish_reason = checks.finish_reason(item.url, response)
            outcome.prompt_tokens, outcome.completion_tokens = checks.token_counts(response)
            outcome.json_valid, outcome.schema_valid = checks.json_validity(item.url, body, response)
            outcome.tool_calls_valid = checks.tool_call_validity(item.url, body, response)
            outcome.ignored = undeclared + [p for p in checks.ignored_parameters(item.url, body, response)
                                            if p not in undeclared]
        return outcome


def replay(workload: Any, targets: Any, **kwargs: Any) -> Report:
    """Replay ``workload`` (a :class:`~tgi_nb.migrate.workload.Workload`, a Batch input file, or request dicts)
    on ``targets`` (an endpoint, ``connect()``'s endpoint, an ``openai.OpenAI`` client, a base URL, or
    ``(target, {"temperature": 0.7})`` to change every request; one or a list) and report what changed.

    Keyword arguments are :class:`Replay`'s (``concurrency``, ``similarity_with``, ``retry_refused``, ``timeout``).

    Example:
        >>> from tgi_nb import migrate
        >>> report = migrate.replay("workload.jsonl", [endpoint, (endpoint, {"temperature": 0.7})])  # doctest: +SKIP
        >>> report.summary()[0]["finish_reasons"], report.to_csv("report.csv")                     # doctest: +SKIP
    """
    return Replay(workload, targets, **kwargs).run()
