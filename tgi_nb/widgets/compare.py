"""``CompareWidget``: the same prompts through several targets (endpoints, models, or one endpoint at several
parameter settings), streamed side by side, with a table of latency, TTFT, tokens/s, tokens and answers: how
a user decides whether the open model is good enough to migrate to.
"""

from __future__ import annotations

import html
import threading
from typing import Any, Optional, Union

import ipywidgets as w

from .chat import ChatWidget, format_stats
from .lifecycle import replace_in_cell
from .parameters import ParametersWidget
from .target import Target

TIMEOUT_S = 600


def _columns(targets: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, target, parameter overrides) for each column."""
    items = list(targets.items()) if isinstance(targets, dict) else [(None, t) for t in targets]
    columns = []
    for label, item in items:
        target, overrides = item if isinstance(item, tuple) else (item, {})
        if not isinstance(overrides, dict):
            raise TypeError(f"targets: a (target, parameters) pair needs a dict of parameters, "
                            f"got {type(overrides).__name__}")
        name = label or Target.of(target).label + "".join(f" {k}={v}" for k, v in overrides.items())
        columns.append((name, target, overrides))
    if len(columns) < 2:
        raise ValueError(f"targets: compare needs at least 2 targets, got {len(columns)}")
    return columns


class CompareWidget(w.VBox):
    """Run each prompt through every target at once and tabulate the answers.

    ``targets``: a list (or a ``{label: ...}`` dict) of endpoints, clients, base URLs, or ``(target, params)``
    pairs whose params override ``parameters`` for that column (one endpoint at several temperatures).

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
        self.columns = _columns(targets)
        self.parameters = parameters
        self.results: list[dict[str, Any]] = []
        self.prompts = w.Textarea(value="\n".join(prompts or ["Explain what a KV cache is in two sentences."]),
                                  description="prompts", placeholder="one prompt per line",
                                  layout=w.Layout(width="auto", height="70px"))
        self.prompts.add_class("tgi-compare-prompts")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.run_button.add_class("tgi-compare-run")
        self.stop_button = w.Button(description="Stop", button_style="danger", disabled=True)
        self.stop_button.add_class("tgi-compare-stop")
        self.table = w.HTML()
        self.table.add_class("tgi-compare-table")
        self.chats = [ChatWidget(target, parameters=None, history=False) for _, target, _ in self.columns]
        panes = [w.VBox([w.HTML(f"<b>{html.escape(label)}</b>"), chat.transcript],
                        layout=w.Layout(flex="1 1 0", min_width="200px"))
                 for (label, _, _), chat in zip(self.columns, self.chats)]
        super().__init__([self.prompts, w.HBox([self.run_button, self.stop_button]), w.HBox(panes), self.table])
        self.add_class("tgi-compare")
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self._thread: Optional[threading.Thread] = None
        self._stopped = threading.Event()
        replace_in_cell(self)

    def _params(self, overrides: dict[str, Any]) -> dict[str, Any]:
        base = self.parameters.params if isinstance(self.parameters, ParametersWidget) else dict(self.parameters or {})
        return {**base, **overrides}

    def run(self) -> "CompareWidget":
        """Start the comparison in a background thread and return at once (``wait()`` blocks)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("a comparison is running: stop() or wait() first")
        prompts = [p.strip() for p in self.prompts.value.splitlines() if p.strip()]
        if not prompts:
            raise ValueError("prompts: enter at least one prompt")
        self._stopped.clear()
        self.results = []
        self.run_button.disabled, self.stop_button.disabled = True, False
        self._thread = threading.Thread(target=self._run, args=(prompts,), name="tgi_nb-compare", daemon=True)
        self._thread.start()
        return self

    def _run(self, prompts: list[str]) -> None:
        try:
            for prompt in prompts:
                if self._stopped.is_set():
                    break
                for chat, (_, _, overrides) in zip(self.chats, self.columns):
                    chat.parameters = self._params(overrides)
                    chat.send(prompt)
                for chat, (label, _, _) in zip(self.chats, self.columns):
                    chat.wait(TIMEOUT_S)
                    stats = dict(chat.last_stats or {})
                    answer = chat.messages[-1]["content"] if chat.messages and stats.get("error") is None else ""
                    self.results.append({"prompt": prompt, "target": label, "latency_s": stats.get("elapsed_s"),
                                         **stats, "answer": answer})
                self._draw()
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    def stop(self) -> None:
        """Stop the answers streaming now and skip the remaining prompts."""
        self._stopped.set()
        for chat in self.chats:
            chat.stop()

    def wait(self, timeout: Optional[float] = None) -> "CompareWidget":
        """Block until the comparison ended (scripts and tests). Raises ``TimeoutError``."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the comparison did not end within timeout={timeout} s")
        return self

    def _draw(self) -> None:
        def cell(value: Any, fmt: str = "{:.2f}") -> str:
            return "–" if value is None else fmt.format(value)

        rows = "".join(
            f"<tr><td>{html.escape(r['prompt'][:60])}</td><td>{html.escape(r['target'])}</td>"
            f"<td>{cell(r['latency_s'])}</td><td>{cell(r.get('ttft_s'))}</td>"
            f"<td>{cell(r.get('tokens_per_s'), '{:.1f}')}</td><td>{r.get('tokens', 0)}</td>"
            f"<td>{html.escape(r.get('error') or format_stats(r).split(' · ')[-1])}</td>"
            f"<td>{html.escape(r['answer'][:200])}</td></tr>" for r in self.results)
        self.table.value = ("<table class='tgi-compare-results' style='font-size:12px'><tr><th>prompt</th>"
                            "<th>target</th><th>latency (s)</th><th>TTFT (s)</th><th>tok/s</th><th>tokens</th>"
                            f"<th>end</th><th>answer</th></tr>{rows}</table>")

    def close(self) -> None:
        if hasattr(self, "_stopped"):  # not when __init__ failed (ipywidgets closes in __del__)
            self.stop()
            for chat in self.chats:
                chat.close()
        super().close()
