"""``CompareWidget``: the same prompts through several targets (endpoints, models, or one endpoint at several
parameter settings), streamed side by side, with a table of latency, TTFT, tokens/s, tokens and answers: how
a user decides whether the open model is good enough to migrate to.

Each column is a transcript and a stream of its own (:func:`~tgi_nb.widgets.streaming.stream_reply`), all
driven from the widget's one :class:`~tgi_nb.widgets.lifecycle.Worker`; the table's figures come from the
streams themselves.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import ipywidgets as w

from .controls import button, styled
from .lifecycle import Job, Worker, replace_in_cell
from .parameters import ParametersWidget, split_openai_kwargs
from .streaming import Reply, end_reason, stream_reply
from .target import Target
from .transcript import Transcript


@dataclass
class Column:
    """One column of a comparison: its label, target, parameter overrides, and the transcript of its prompts
    and answers."""

    label: str
    target: Target
    overrides: dict[str, Any]
    transcript: Transcript = field(default_factory=Transcript, repr=False)


def _columns(targets: Any) -> list[Column]:
    """A column for each target (a ``(target, overrides)`` pair or a target, in a list or a labelled dict).

    Example:
        >>> [c.label for c in _columns(["http://a:1", ("http://a:1", {"temperature": 0})])]
        ['a:1', 'a:1 temperature=0']
    """
    items = list(targets.items()) if isinstance(targets, dict) else [(None, t) for t in targets]
    columns = []
    for label, item in items:
        target, overrides = item if isinstance(item, tuple) else (item, {})
        if not isinstance(overrides, dict):
            raise TypeError(f"targets: a (target, parameters) pair needs a dict of parameters, "
                            f"got {type(overrides).__name__}")
        resolved = Target.of(target)
        name = label or resolved.label + "".join(f" {k}={v}" for k, v in overrides.items())
        columns.append(Column(name, resolved, overrides))
    if len(columns) < 2:
        raise ValueError(f"targets: compare needs at least 2 targets, got {len(columns)}")
    return columns


class CompareWidget(w.VBox):
    """Run each prompt through every target at once and tabulate the answers.

    ``targets``: a list (or a ``{label: ...}`` dict) of endpoints, clients, base URLs, or ``(target, params)``
    pairs whose params override ``parameters`` for that column (one endpoint at several temperatures).
    ``chats`` holds the columns (label, target, overrides, transcript); ``results`` a row per prompt and column.

    Example:
        >>> from tgi_nb.widgets import CompareWidget
        >>> cmp = CompareWidget([(endpoint, {"temperature": 0}), (endpoint, {"temperature": 1.2})],
        ...                     prompts=["Name three colours."], parameters={"max_tokens": 64})   # doctest: +SKIP
        >>> cmp.run().wait()                                                                   # doctest: +SKIP
        >>> [row["tokens"] for row in cmp.results]                                             # doctest: +SKIP
        [12, 40]
    """

    def __init__(self, targets: Any, prompts: Optional[list[str]] = None,
                 parameters: Union[ParametersWidget, dict, None] = None):
        self.chats = _columns(targets)
        self.parameters = parameters
        self.results: list[dict[str, Any]] = []
        self._worker = Worker("compare")
        self.prompts = styled(w.Textarea(value="\n".join(prompts or ["Explain what a KV cache is in two sentences."]),
                                         description="prompts", placeholder="one prompt per line",
                                         layout=w.Layout(width="auto", height="70px")), "tgi-compare-prompts")
        self.run_button = button("Run", "tgi-compare-run", self.run, style="primary", icon="play")
        self.stop_button = button("Stop", "tgi-compare-stop", self.stop, style="danger")
        self.stop_button.disabled = True
        self.table = styled(w.HTML(), "tgi-compare-table")
        panes = [w.VBox([w.HTML(f"<b>{html.escape(column.label)}</b>"), column.transcript],
                        layout=w.Layout(flex="1 1 0", min_width="200px")) for column in self.chats]
        super().__init__([self.prompts, w.HBox([self.run_button, self.stop_button]), w.HBox(panes), self.table])
        self.add_class("tgi-compare")
        replace_in_cell(self)

    def _params(self, overrides: dict[str, Any]) -> dict[str, Any]:
        base = self.parameters.params if isinstance(self.parameters, ParametersWidget) else dict(self.parameters or {})
        return {**base, **overrides}

    def run(self) -> "CompareWidget":
        """Start the comparison in the background and return at once (``wait()`` blocks)."""
        if self._worker.busy:
            raise RuntimeError("a comparison is running: stop() or wait() first")
        prompts = [p.strip() for p in self.prompts.value.splitlines() if p.strip()]
        if not prompts:
            raise ValueError("prompts: enter at least one prompt")
        self.results = []
        self.run_button.disabled, self.stop_button.disabled = True, False
        if self._worker.start(lambda job: self._run(job, prompts), on_end=self._ended) is None:  # closed
            self._ended(None)
        return self

    def _run(self, job: Job, prompts: list[str]) -> None:
        for prompt in prompts:
            if job.stopping.is_set():
                break
            replies: list[Optional[Reply]] = [None] * len(self.chats)

            def stream(index: int, column: Column) -> None:
                column.transcript.add("user", prompt)
                column.transcript.start_reply()
                replies[index] = stream_reply(column.target, [{"role": "user", "content": prompt}],
                                              split_openai_kwargs(self._params(column.overrides)), job,
                                              column.transcript.append)

            streams = [threading.Thread(target=stream, args=(i, column), name="tgi_nb-compare-stream", daemon=True)
                       for i, column in enumerate(self.chats)]
            for thread in streams:
                thread.start()
            for thread in streams:
                thread.join()
            for column, reply in zip(self.chats, replies):
                stats = reply.show_end(column.transcript, column.target.base_url)
                self.results.append({"prompt": prompt, "target": column.label, "latency_s": stats["elapsed_s"],
                                     **stats, "answer": reply.text if stats["error"] is None else ""})
            self._draw()

    def _ended(self, error: Optional[BaseException]) -> None:
        if error is not None:
            self.table.value += f"<div style='color:#b91c1c'>{html.escape(f'{type(error).__name__}: {error}')}</div>"
        self.run_button.disabled, self.stop_button.disabled = False, True

    def stop(self) -> None:
        """Stop the answers streaming now and skip the remaining prompts."""
        self._worker.stop()

    def wait(self, timeout: Optional[float] = None) -> "CompareWidget":
        """Block until the comparison ended (scripts and tests). Raises ``TimeoutError``."""
        if not self._worker.wait(timeout):
            raise TimeoutError(f"the comparison did not end within timeout={timeout} s")
        return self

    def _draw(self) -> None:
        def cell(value: Any, fmt: str = "{:.2f}") -> str:
            return "–" if value is None else fmt.format(value)

        rows = "".join(
            f"<tr><td>{html.escape(r['prompt'][:60])}</td><td>{html.escape(r['target'])}</td>"
            f"<td>{cell(r['latency_s'])}</td><td>{cell(r.get('ttft_s'))}</td>"
            f"<td>{cell(r.get('tokens_per_s'), '{:.1f}')}</td><td>{r.get('tokens', 0)}</td>"
            f"<td>{html.escape(end_reason(r))}</td>"
            f"<td>{html.escape(r['answer'][:200])}</td></tr>" for r in self.results)
        self.table.value = ("<table class='tgi-compare-results' style='font-size:12px'><tr><th>prompt</th>"
                            "<th>target</th><th>latency (s)</th><th>TTFT (s)</th><th>tok/s</th><th>tokens</th>"
                            f"<th>end</th><th>answer</th></tr>{rows}</table>")

    def close(self) -> None:
        """Stop the comparison; the columns' transcripts close with the widget."""
        if hasattr(self, "_worker"):  # not when __init__ failed (ipywidgets closes in __del__)
            self._worker.close()
            for column in self.chats:
                column.transcript.close()
        super().close()
