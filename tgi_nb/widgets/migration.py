"""``MigrationWidget``: the migration check in a notebook. Load a workload (a Batch input file recorded with
``tgi_nb.migrate.record``, with its answers), pick the targets, replay it with progress in a background thread,
read the report as tables and charts, open one request side by side, and export the report.

It is :func:`tgi_nb.migrate.replay` with a face: the widget shows the call it stands for. The replay runs as the
widget's one :class:`~tgi_nb.widgets.lifecycle.Worker` job; Stop (or closing the widget) sends no more requests.
"""

from __future__ import annotations

import base64
import html
import json
import time
from typing import Any, Optional

import ipywidgets as w

from tgi_nb.migrate import Replay, ReplayTarget, Report, Workload

from .controls import button, styled
from .lifecycle import Job, Worker, replace_in_cell
from .migration_view import charts, outcome_rows, side_by_side, summary_table

REDRAWS_PER_SECOND = 4  # the results table is redrawn whole: a few times a second is plenty


def _running_endpoints() -> list[Any]:
    from tgi_nb.endpoints import list_inference_endpoints

    try:
        return [e for e in list_inference_endpoints() if e.status == "running"]
    except Exception:  # noqa: BLE001 - an endpoint registry in trouble must not stop the widget
        return []


def _download(name: str, text: str, mime: str) -> str:
    data = base64.b64encode(text.encode()).decode("ascii")
    return (f"<a class='tgi-migration-download' download='{html.escape(name)}' href='data:{mime};base64,{data}' "
            f"style='margin-right:12px'>⬇ {html.escape(name)}</a>")


class MigrationWidget(w.VBox):
    """Replay a recorded workload on targets and show what changed.

    ``targets``: endpoints, ``openai.OpenAI`` clients, base URLs or ``(target, {"temperature": 0.7})`` pairs
    (the endpoints running in this kernel are offered too); ``workload``: a path, a
    :class:`~tgi_nb.migrate.Workload` or request dicts (else load one with the upload button or a path).
    ``run()`` returns at once; ``wait()`` blocks; ``report`` is the last :class:`~tgi_nb.migrate.Report`.

    Example:
        >>> from tgi_nb.widgets import MigrationWidget
        >>> widget = MigrationWidget([endpoint, (endpoint, {"temperature": 0.8})], "workload.jsonl")  # doctest: +SKIP
        >>> widget.run().wait().report.summary()                                                  # doctest: +SKIP
    """

    def __init__(self, targets: Any = None, workload: Any = None, *, concurrency: int = 4):
        self.workload: Optional[Workload] = None
        self.workload_name = "workload.jsonl"
        self.report: Optional[Report] = None
        self.replay: Optional[Replay] = None
        self.error: Optional[str] = None
        self._targets: dict[str, Any] = {}
        self._worker = Worker("migration")
        self._last_draw = 0.0

        self.upload = styled(w.FileUpload(accept=".jsonl", multiple=True, description="Load JSONL"),
                             "tgi-migration-upload")
        self.path = styled(w.Text(placeholder="or a path: workload.jsonl", layout=w.Layout(width="260px")),
                           "tgi-migration-path")
        self.load_button = button("Load", "tgi-migration-load", lambda: self._guard(self._load_path))
        self.workload_info = styled(w.HTML("No workload loaded yet."), "tgi-migration-workload")
        self.picker = styled(w.SelectMultiple(options=[], rows=4, description="targets",
                                              layout=w.Layout(width="460px")), "tgi-migration-targets")
        self.url = w.Text(placeholder="add a base URL: http://host:port", layout=w.Layout(width="260px"))
        self.add_button = button("Add", "tgi-migration-add", lambda: self._guard(self._add_url))
        self.concurrency = w.BoundedIntText(value=concurrency, min=1, max=32, description="concurrency",
                                            layout=w.Layout(width="180px"))
        self.run_button = button("Run", "tgi-migration-run", lambda: self._guard(self.run), style="primary",
                                 icon="play")
        self.stop_button = button("Stop", "tgi-migration-stop", self.stop, style="danger")
        self.stop_button.disabled = True
        self.progress = styled(w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="300px")),
                               "tgi-migration-progress")
        self.status = styled(w.HTML(), "tgi-migration-status")
        self.summary, self.plots, self.table, self.detail, self.export, self.code = (
            styled(w.HTML(), css) for css in ("tgi-migration-summary-box", "tgi-migration-plots",
                                              "tgi-migration-results", "tgi-migration-detail-box",
                                              "tgi-migration-export", "tgi-migration-code"))
        self.request_picker = styled(w.Dropdown(options=[], description="request", layout=w.Layout(width="300px")),
                                     "tgi-migration-request")
        self.request_picker.observe(lambda change: self.show(change["new"]) if change["new"] else None, "value")
        self.upload.observe(lambda change: self._guard(lambda: self._load_upload(change["new"])), "value")
        self.picker.observe(lambda _: self._show_code(), "value")
        self.concurrency.observe(lambda _: self._show_code(), "value")

        super().__init__([
            w.HTML("<b>Migration check</b>: replay recorded OpenAI requests on open models"),
            w.HBox([self.upload, self.path, self.load_button]), self.workload_info,
            w.HBox([self.picker, w.VBox([w.HBox([self.url, self.add_button]), self.concurrency])]),
            w.HBox([self.run_button, self.stop_button, self.progress, self.status]),
            self.summary, self.plots, self.request_picker, self.detail, self.table, self.export, self.code])
        self.add_class("tgi-migration")
        for target in ([] if targets is None else targets if isinstance(targets, list) else [targets]):
            self.add_target(target)
        for endpoint in _running_endpoints():
            if not any(t is endpoint for t in self._targets.values()):
                self.add_target(endpoint, select=not self._targets)
        if workload is not None:
            self.load(workload)
        self._show_code()
        replace_in_cell(self)

    def _guard(self, action: Any) -> None:
        """Run a click's action, showing its error in the widget (a handler that raises shows nothing)."""
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - shown to the user instead of vanishing in the front-end's log
            self._show_error(exc)

    def _show_error(self, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.status.value = f"<span style='color:#dc2626'>{html.escape(self.error)}</span>"

    # ------------------------------------------------------------------------------------------------ input
    def load(self, workload: Any, name: Optional[str] = None) -> "MigrationWidget":
        """Use ``workload`` (a path, a ``Workload`` or request dicts)."""
        self.workload = Workload.of(workload)
        self.workload_name = name or (str(workload) if isinstance(workload, str) else "workload.jsonl")
        routes: dict[str, int] = {}
        for item in self.workload:
            routes[item.url] = routes.get(item.url, 0) + 1
        answered = sum(item.reference is not None for item in self.workload)
        self.workload_info.value = (
            f"<b>{len(self.workload)}</b> requests ({html.escape(', '.join(f'{r} x{n}' for r, n in routes.items()))})"
            f", {answered} with a recorded answer" + ("" if answered else ": the first target is the reference"))
        self.request_picker.options = [item.custom_id for item in self.workload]
        self._show_code()
        return self

    def _load_path(self) -> None:
        self.load(self.path.value.strip(), name=self.path.value.strip())

    def _load_upload(self, files: Any) -> None:
        if not files:
            return
        texts = {f["name"]: bytes(f["content"]).decode("utf-8") for f in files}
        answers = [n for n in texts if n.endswith(".responses.jsonl")]
        requests = [n for n in texts if n not in answers]
        if len(requests) != 1:
            raise ValueError("upload: one workload file (and optionally its .responses.jsonl), got "
                             f"{', '.join(texts) or 'nothing'}")
        workload = Workload.of([json.loads(line) for line in texts[requests[0]].splitlines() if line.strip()])
        for name in answers:
            workload.attach_responses(json.loads(line) for line in texts[name].splitlines() if line.strip())
        self.load(workload, name=requests[0])

    def add_target(self, target: Any, select: bool = True) -> "MigrationWidget":
        """Offer ``target`` (an endpoint, client, base URL or ``(target, settings)``), selected by default."""
        label = ReplayTarget.of(target).label
        while label in self._targets:
            label += "'"
        self._targets[label] = target
        selected = list(self.picker.value) + ([label] if select else [])
        self.picker.options = list(self._targets)
        self.picker.value = tuple(selected)
        self._show_code()
        return self

    def _add_url(self) -> None:
        url = self.url.value.strip()
        self.add_target(url)
        self.url.value = ""

    @property
    def selected(self) -> list[Any]:
        """The targets the next run replays on."""
        return [self._targets[label] for label in self.picker.value]

    # ------------------------------------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        return self._worker.busy

    def run(self) -> "MigrationWidget":
        """Replay the workload on the selected targets in the background; returns at once."""
        if self._worker.busy:
            raise RuntimeError("a replay is running: stop() or wait() first")
        if self.workload is None:
            raise ValueError("workload: load a workload file first")
        if not self.picker.value:
            raise ValueError("targets: select at least one target")
        self.error = None
        replay = self.replay = Replay(self.workload, self.selected, concurrency=self.concurrency.value)
        self.progress.max, self.progress.value = replay.total, 0
        self.status.value = f"0/{replay.total}"
        self.run_button.disabled, self.stop_button.disabled = True, False  # before the job can end
        if self._worker.start(lambda job: self._run(job, replay), on_end=self._ended) is None:  # closed
            self.run_button.disabled, self.stop_button.disabled = False, True
        return self

    def _run(self, job: Job, replay: Replay) -> None:
        job.on_stop(replay.stop)
        report = replay.run(on_outcome=lambda _: self._progress(replay))
        self.report = report
        self.summary.value = summary_table(report)
        self.plots.value = charts(report)
        self.table.value = outcome_rows(report.outcomes)
        self.export.value = (_download("migration_report.md", report.to_markdown(max_rows=10**6), "text/markdown")
                             + _download("migration_report.csv", report.to_csv(), "text/csv"))
        if self.request_picker.value:
            self.show(self.request_picker.value)
        self.status.value = (f"{replay.done}/{replay.total} done" + (" (stopped)" if replay.stopped else "")
                             + f"; reference: {html.escape(report.reference_label)}")

    def _ended(self, error: Optional[BaseException]) -> None:
        if error is not None:
            self._show_error(error)
        self.run_button.disabled, self.stop_button.disabled = False, True

    def _progress(self, replay: Replay) -> None:
        self.progress.value = replay.done
        now = time.monotonic()
        if now - self._last_draw >= 1.0 / REDRAWS_PER_SECOND or replay.done == replay.total:
            self._last_draw = now
            self.status.value = f"{replay.done}/{replay.total}" + (
                "; scoring similarity…" if replay.done == replay.total else "")
            self.table.value = outcome_rows(list(replay.outcomes))

    def stop(self) -> None:
        """Send no more requests (those in flight finish); the report covers what was done."""
        self._worker.stop()

    def wait(self, timeout: Optional[float] = None) -> "MigrationWidget":
        """Block until the replay ended (scripts and tests). Raises ``TimeoutError``."""
        if not self._worker.wait(timeout):
            raise TimeoutError(f"the replay did not end within timeout={timeout} s")
        return self

    # ------------------------------------------------------------------------------------------------ output
    def show(self, custom_id: str) -> None:
        """Show one request side by side: what was asked, the reference, each target's answer."""
        if self.report is not None:
            self.detail.value = side_by_side(self.report, custom_id)
        if self.request_picker.value != custom_id and custom_id in self.request_picker.options:
            self.request_picker.value = custom_id

    def _show_code(self) -> None:
        targets = "; ".join(self.picker.value) or "none selected"
        self.code.value = ("<pre style='font-size:11px'>from tgi_nb import migrate\n\n"
                           f"targets = [...]  # {html.escape(targets)}\n"
                           f"report = migrate.replay({html.escape(repr(self.workload_name))}, targets, "
                           f"concurrency={self.concurrency.value})\nreport.to_csv('migration_report.csv')</pre>")

    def close(self) -> None:
        if hasattr(self, "_worker"):  # not when __init__ failed (ipywidgets closes in __del__)
            self._worker.close()
        super().close()
