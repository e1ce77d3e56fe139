"""``CompareWidget``: the same prompts through several targets (endpoints, models, or one endpoint at several
parameter settings), streamed side by side, with a table of latency, TTFT, tokens/s, tokens and answers: how
a user decides whether the open model is good enough to migrate to.

Each column is a transcript and a stream of its own (:func:`~tgi_nb.widgets.streaming.stream_reply`), all
driven from the widget's one :class:`~tgi_nb.widgets.lifecycle.Worker`; the table's figures come from the
streams themselves. The table downloads as CSV (``to_csv()``) and becomes a pandas DataFrame
(``to_dataframe()``).
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import ipywidgets as w

from .controls import button, styled
from .conversation import download_link
from .lifecycle import Job, Worker, replace_in_cell, start_thread
from .parameters import ParametersWidget, split_openai_kwargs
from .streaming import Reply, end_reason, stream_reply
from .target import Target
from .transcript import Transcript


_TABLE_CSS = """
.tgi-compare-results { font-size: 12px; border-collapse: collapse; width: 100%; }
.tgi-compare-results td, .tgi-compare-results th { padding: 2px 6px; vertical-align: top; text-align: left;
  border-bottom: 1px solid var(--jp-border-color2, #e5e7eb); }
.tgi-compare-prompt td { background: var(--jp-layout-color2, #f3f4f6); }
.tgi-compare-answer { max-width: 520px; }
"""
ANSWER_CHARS = 160


def shorten(text: str, limit: int = ANSWER_CHARS) -> str:
    """``text`` on one line, cut at a word boundary with an ellipsis when longer than ``limit`` characters.

    Example:
        >>> shorten("The quick brown fox jumps over the lazy dog", 20)
        'The quick brown fox…'
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] if " " in text[:limit] else text[:limit]
    return cut.rstrip(" ,.;:") + "…"


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
        self.exports = styled(w.HTML(), "tgi-compare-export")
        panes = [w.VBox([w.HTML(f"<b>{html.escape(column.label)}</b>"), column.transcript],
                        layout=w.Layout(flex="1 1 0", min_width="200px")) for column in self.chats]
        super().__init__([self.prompts, w.HBox([self.run_button, self.stop_button]), w.HBox(panes), self.table,
                          self.exports])
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

            streams = [start_thread(stream, i, column, name="compare-stream") for i, column in enumerate(self.chats)]
            for thread in streams:
                thread.join()
            for column, reply in zip(self.chats, replies):
                stats = reply.show_end(column.transcript, column.target.base_url)
                self.results.append({"prompt": prompt, "target": column.label, "latency_s": stats["elapsed_s"],
                                     **stats, "answer": reply.text if stats["error"] is None else "",
                                     "thinking": reply.reasoning if stats["error"] is None else ""})
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

    COLUMNS = ("prompt", "target", "latency_s", "ttft_s", "tokens_per_s", "tokens", "thinking_tokens",
               "finish_reason", "error", "answer", "thinking")

    def rows(self) -> list[dict[str, Any]]:
        """The results as flat rows (one per prompt and target) with the table's columns.

        Example:
            >>> cmp = CompareWidget(["http://a:1", "http://b:1"])
            >>> cmp.results = [{"prompt": "Hi", "target": "a:1", "latency_s": 1.0, "tokens": 3, "answer": "Hey"}]
            >>> cmp.rows()[0]["answer"], cmp.to_csv().splitlines()[0].split(",")[:4]
            ('Hey', ['prompt', 'target', 'latency_s', 'ttft_s'])
        """
        return [{key: r.get(key) for key in self.COLUMNS} for r in self.results]

    def to_csv(self) -> str:
        """The table as CSV text (what the CSV link downloads)."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return out.getvalue()

    def to_dataframe(self) -> Any:
        """The table as a pandas DataFrame (``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as exc:  # not a dependency of tgi_nb: the CSV needs nothing
            raise ImportError("to_dataframe() needs pandas: pip install pandas (or use to_csv())") from exc
        return pd.DataFrame(self.rows(), columns=list(self.COLUMNS))

    def _draw(self) -> None:
        def cell(value: Any, fmt: str = "{:.2f}") -> str:
            return "–" if value is None else fmt.format(value)

        thinking = any(r.get("thinking_tokens") for r in self.results)
        head = ["target", "latency (s)", "TTFT (s)", "tok/s", "tokens", *(["thinking"] if thinking else []),
                "end", "answer"]
        rows, prompt = [], None
        for r in self.results:
            if r["prompt"] != prompt:  # the prompt once, above its answers
                prompt = r["prompt"]
                rows.append(f"<tr class='tgi-compare-prompt'><td colspan='{len(head)}'><b>Prompt:</b> "
                            f"{html.escape(prompt)}</td></tr>")
            answer = r["answer"] or ""
            rows.append(
                f"<tr><td>{html.escape(r['target'])}</td><td>{cell(r['latency_s'])}</td>"
                f"<td>{cell(r.get('ttft_s'))}</td><td>{cell(r.get('tokens_per_s'), '{:.1f}')}</td>"
                f"<td>{r.get('tokens', 0)}</td>" + (f"<td>{r.get('thinking_tokens') or 0}</td>" if thinking else "")
                + f"<td>{html.escape(end_reason(r))}</td>"
                f"<td class='tgi-compare-answer' title='{html.escape(answer)}'>{html.escape(shorten(answer))}</td>"
                "</tr>")
        header = "".join(f"<th>{h}</th>" for h in head)
        self.table.value = (f"<style>{_TABLE_CSS}</style><table class='tgi-compare-results'><tr>{header}</tr>"
                            f"{''.join(rows)}</table>")
        self.exports.value = ("<span style='font-size:12px'>Export: "
                              + download_link(self.to_csv(), "compare.csv", "CSV", "text/csv", "tgi-compare-export-csv")
                              + " · <code>compare.to_dataframe()</code></span>")

    def close(self) -> None:
        """Stop the comparison; the columns' transcripts close with the widget."""
        if hasattr(self, "_worker"):  # not when __init__ failed (ipywidgets closes in __del__)
            self._worker.close()
            for column in self.chats:
                column.transcript.close()
        super().close()
