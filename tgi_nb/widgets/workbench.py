"""``tgi_nb.workbench()``: the widgets in tabs, wired together: the endpoint made or picked in the Endpoint
tab is the one the Chat, Compare, Monitor, RAG and Migration tabs talk to, with the Parameters tab's values. Once
that endpoint runs, the Parameters tab starts from its own defaults (``/info``), the Endpoint tab points to the Chat
tab, and the RAG tab is built (its pipeline needs the URL).
"""

from __future__ import annotations

import html
import threading
from typing import Any, Optional

import ipywidgets as w

from .chat import ChatWidget
from .compare import CompareWidget
from .controls import button
from .endpoint import EndpointWidget
from .lifecycle import Worker, replace_in_cell
from .migration import MigrationWidget
from .monitor import MonitorWidget
from .parameters import ParametersWidget
from .target import Target

TAB_TITLES = ("Endpoint", "Parameters", "Chat", "Compare", "Monitor", "RAG", "Migration")


class Workbench(w.Tab):
    """Tabs: Endpoint | Parameters | Chat | Compare | Monitor | RAG | Migration. ``endpoint_widget.endpoint`` drives
    the rest.

    Example:
        >>> import tgi_nb
        >>> bench = tgi_nb.workbench()
        >>> bench.titles
        ('Endpoint', 'Parameters', 'Chat', 'Compare', 'Monitor', 'RAG', 'Migration')
        >>> bench.close()
    """

    def __init__(self, endpoint: Any = None, **endpoint_form: Any):
        self.parameters = ParametersWidget()
        self.endpoint_widget = EndpointWidget(**endpoint_form)
        self.chat: Optional[ChatWidget] = None
        self.compare: Optional[CompareWidget] = None
        self.monitor: Optional[MonitorWidget] = None
        self.migration: Optional[MigrationWidget] = None
        self.rag: Any = None
        self._rag_for: Any = None  # the endpoint the RAG tab is built (or being built) for
        self._rag_lock = threading.Lock()
        self._defaults_worker = Worker("workbench-defaults")
        hint = "Create, connect to or pick an endpoint in the <b>Endpoint</b> tab first."
        self._chat_box, self._compare_box, self._monitor_box, self._rag_box, self._migration_box = (
            w.VBox([w.HTML(hint)]) for _ in range(5))
        self.next_step = w.HBox([w.HTML("<b>The endpoint runs.</b> Talk to it in the Chat tab, or compare "
                                        "settings, watch its load, ask your documents in the next tabs."),
                                 button("Open the Chat tab", "tgi-workbench-to-chat", self.open_chat, icon="comments")],
                                layout=w.Layout(display="none", align_items="center"))
        self.next_step.add_class("tgi-workbench-next")
        super().__init__([w.VBox([self.endpoint_widget, self.next_step]), self.parameters, self._chat_box,
                          self._compare_box, self._monitor_box, self._rag_box, self._migration_box],
                         titles=TAB_TITLES)
        self.add_class("tgi-workbench")
        self.endpoint_widget.observe(self._endpoint_changed, "endpoint")
        self.endpoint_widget.observe(self._on_endpoint_status, "status")
        if endpoint is not None:
            self.endpoint_widget.use(endpoint)
        replace_in_cell(self)

    def _endpoint_changed(self, change: Any) -> None:
        endpoint = change["new"]
        for widget in (self.chat, self.compare, self.monitor, self.rag, self.migration):
            if widget is not None:
                widget.close()
        with self._rag_lock:
            self.rag, self._rag_for = None, None
        if endpoint is None:
            return

        self.chat = ChatWidget(endpoint, parameters=self.parameters)
        self.compare = CompareWidget([(endpoint, {"temperature": t}) for t in (0.0, 0.7, 1.2)],
                                     parameters=self.parameters)
        self.monitor = MonitorWidget(endpoint)
        # Greedy against sampled: how much of a recorded workload survives a change of settings.
        self.migration = MigrationWidget([endpoint, (endpoint, {"temperature": 0.8})])
        self._migration_box.children = [self.migration]
        self._rag_box.children = [w.HTML("The RAG tab starts once the endpoint runs.")]
        self._chat_box.children = [self.chat]
        self._compare_box.children = [self.compare]
        self._monitor_box.children = [self.monitor]
        if endpoint.status == "running":  # picked running: its status may not change again
            self._follow_defaults(endpoint)
            self._build_rag(endpoint)

    def open_chat(self) -> None:
        """Show the Chat tab."""
        self.selected_index = TAB_TITLES.index("Chat")

    def _on_endpoint_status(self, change: Any) -> None:
        running = change["new"] == "running"
        self.next_step.layout.display = "" if running else "none"
        if running:
            endpoint = self.endpoint_widget.endpoint
            self._follow_defaults(endpoint)
            self._build_rag(endpoint)

    def _follow_defaults(self, endpoint: Any) -> None:
        """The Parameters tab starts from the endpoint's own defaults and URL (read from /info in the
        background: this runs from a status change, which must return at once)."""
        def read(_job: Any) -> None:
            target = Target.of(endpoint)
            base_url = target.base_url
            if base_url is None:
                return
            defaults: dict[str, Any] = {}
            try:
                import httpx

                token = target.token
                response = httpx.get(base_url[: -len("/v1")] + "/info", timeout=10,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
                if response.status_code == 200:
                    defaults = response.json().get("generation_config") or {}
            except (httpx.HTTPError, ValueError):  # a server without TGI's /info (vLLM, OpenAI): OpenAI's defaults
                pass
            if endpoint is self.endpoint_widget.endpoint:
                self.parameters.use_endpoint_defaults(defaults, base_url)

        self._defaults_worker.submit(read)

    def _build_rag(self, endpoint: Any) -> None:
        with self._rag_lock:
            if endpoint is None or endpoint is self._rag_for or self.comm is None:
                return
            self._rag_for = endpoint
        self._rag_box.children = [w.HTML("Loading the embedding model for the RAG tab…")]
        # In the background: importing LangChain and chromadb and loading the embedding model take seconds, and
        # this runs from the Endpoint tab's handlers and status changes, which must return at once. A worker
        # per endpoint: a build for an endpoint picked since ends by closing what it made.
        Worker("workbench-rag").start(lambda job: self._make_rag(endpoint))

    def _make_rag(self, endpoint: Any) -> None:
        try:
            from .rag import RagWidget

            rag = RagWidget(endpoint)
        except Exception as exc:  # shown in the tab: the other tabs work without it
            if self._rag_for is endpoint:
                self._rag_box.children = [w.HTML(f"The RAG tab could not start: {html.escape(str(exc))}")]
            return
        with self._rag_lock:
            current = self.comm is not None and self._rag_for is endpoint  # not closed, no other endpoint picked
            if current:
                self.rag = rag
        if not current:
            rag.close()
            return
        self._rag_box.children = [rag]

    def close(self) -> None:
        with self._rag_lock:
            self._rag_for = None
        self._defaults_worker.close()
        for widget in (self.chat, self.compare, self.monitor, self.rag, self.migration, self.endpoint_widget,
                       self.parameters):
            if widget is not None:
                widget.close()
        super().close()


def workbench(endpoint: Any = None, **endpoint_form: Any) -> Workbench:
    """The workbench: one widget with the Endpoint, Parameters, Chat, Compare, Monitor, RAG and Migration tabs.

    ``endpoint``: an endpoint to start with (else create one in the Endpoint tab); ``endpoint_form``: the
    form's defaults (``name``, ``repository``, ``type``, ``backend``).

    Example:
        >>> import tgi_nb
        >>> tgi_nb.workbench()          # doctest: +SKIP
    """
    return Workbench(endpoint, **endpoint_form)
