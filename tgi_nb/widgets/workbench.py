"""``tgi_nb.workbench()``: the widgets in tabs, wired together: the endpoint made or picked in the Endpoint
tab is the one the Chat, Compare, Monitor and RAG tabs talk to, with the Parameters tab's values.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any, Optional

import ipywidgets as w

from .chat import ChatWidget
from .compare import CompareWidget
from .endpoint import EndpointWidget
from .lifecycle import replace_in_cell
from .monitor import MonitorWidget
from .parameters import ParametersWidget

TAB_TITLES = ("Endpoint", "Parameters", "Chat", "Compare", "Monitor", "RAG")


class Workbench(w.Tab):
    """Tabs: Endpoint | Parameters | Chat | Compare | Monitor | RAG. ``endpoint_widget.endpoint`` drives the rest.

    Example:
        >>> import tgi_nb
        >>> bench = tgi_nb.workbench()
        >>> bench.titles
        ('Endpoint', 'Parameters', 'Chat', 'Compare', 'Monitor', 'RAG')
        >>> bench.close()
    """

    def __init__(self, endpoint: Any = None, **endpoint_form: Any):
        self.parameters = ParametersWidget()
        self.endpoint_widget = EndpointWidget(**endpoint_form)
        self.chat: Optional[ChatWidget] = None
        self.compare: Optional[CompareWidget] = None
        self.monitor: Optional[MonitorWidget] = None
        self.rag: Any = None
        hint = "Create, connect to or pick an endpoint in the <b>Endpoint</b> tab first."
        self._chat_box, self._compare_box, self._monitor_box, self._rag_box = (
            w.VBox([w.HTML(hint)]) for _ in range(4))
        super().__init__([self.endpoint_widget, self.parameters, self._chat_box, self._compare_box,
                          self._monitor_box, self._rag_box], titles=TAB_TITLES)
        self.add_class("tgi-workbench")
        self.endpoint_widget.observe(self._endpoint_changed, "endpoint")
        if endpoint is not None:
            self.endpoint_widget.use(endpoint)
        replace_in_cell(self)

    def _endpoint_changed(self, change: Any) -> None:
        endpoint = change["new"]
        for widget in (self.chat, self.compare, self.monitor, self.rag):
            if widget is not None:
                widget.close()
        if endpoint is None:
            return

        self.chat = ChatWidget(endpoint, parameters=self.parameters)
        self.compare = CompareWidget([(endpoint, {"temperature": t}) for t in (0.0, 0.7, 1.2)],
                                     parameters=self.parameters)
        self.monitor = MonitorWidget(endpoint)
        self._rag_box.children = [w.HTML("Loading the embedding model for the RAG tab…")]
        threading.Thread(target=self._build_rag, args=(endpoint,), name="tgi_nb-workbench-rag", daemon=True).start()
        self._chat_box.children = [self.chat]
        self._compare_box.children = [self.compare]
        self._monitor_box.children = [self.monitor]

    def _build_rag(self, endpoint: Any) -> None:
        # In a thread: importing LangChain and chromadb and loading the embedding model take seconds, and this
        # runs from the Endpoint tab's handlers, which must return at once.
        # A local endpoint made from the form has no URL until its server listens: wait for it here.
        while getattr(endpoint, "url", None) is None:
            if self.comm is None or self.endpoint_widget.endpoint is not endpoint:
                return
            time.sleep(0.2)
        try:
            from .rag import RagWidget

            rag = RagWidget(endpoint)
        except Exception as exc:  # shown in the tab: the other tabs work without it
            self._rag_box.children = [w.HTML(f"The RAG tab could not start: {html.escape(str(exc))}")]
            return
        if self.comm is None or self.endpoint_widget.endpoint is not endpoint:  # closed, or another endpoint picked
            rag.close()
            return
        self.rag = rag
        self._rag_box.children = [rag]

    def close(self) -> None:
        for widget in (self.chat, self.compare, self.monitor, self.rag, self.endpoint_widget, self.parameters):
            if widget is not None:
                widget.close()
        super().close()


def workbench(endpoint: Any = None, **endpoint_form: Any) -> Workbench:
    """The workbench: one widget with the Endpoint, Parameters, Chat, Compare, Monitor and RAG tabs.

    ``endpoint``: an endpoint to start with (else create one in the Endpoint tab); ``endpoint_form``: the
    form's defaults (``name``, ``repository``, ``type``, ``backend``).

    Example:
        >>> import tgi_nb
        >>> tgi_nb.workbench()          # doctest: +SKIP
    """
    return Workbench(endpoint, **endpoint_form)
