"""``tgi_nb.workbench()``: the widgets in tabs, wired together: the endpoint made or picked in the Endpoint
tab is the one the Chat, Compare and Monitor tabs talk to, with the Parameters tab's values.
"""

from __future__ import annotations

from typing import Any, Optional

import ipywidgets as w

from .chat import ChatWidget
from .compare import CompareWidget
from .endpoint import EndpointWidget
from .lifecycle import replace_in_cell
from .monitor import MonitorWidget
from .parameters import ParametersWidget

TAB_TITLES = ("Endpoint", "Parameters", "Chat", "Compare", "Monitor")


class Workbench(w.Tab):
    """Tabs: Endpoint | Parameters | Chat | Compare | Monitor. ``endpoint_widget.endpoint`` drives the rest.

    Example:
        >>> import tgi_nb
        >>> bench = tgi_nb.workbench()
        >>> bench.titles
        ('Endpoint', 'Parameters', 'Chat', 'Compare', 'Monitor')
        >>> bench.close()
    """

    def __init__(self, endpoint: Any = None, **endpoint_form: Any):
        self.parameters = ParametersWidget()
        self.endpoint_widget = EndpointWidget(**endpoint_form)
        self.chat: Optional[ChatWidget] = None
        self.compare: Optional[CompareWidget] = None
        self.monitor: Optional[MonitorWidget] = None
        hint = "Create, connect to or pick an endpoint in the <b>Endpoint</b> tab first."
        self._chat_box, self._compare_box, self._monitor_box = (w.VBox([w.HTML(hint)]) for _ in range(3))
        super().__init__([self.endpoint_widget, self.parameters, self._chat_box, self._compare_box,
                          self._monitor_box], titles=TAB_TITLES)
        self.add_class("tgi-workbench")
        self.endpoint_widget.observe(self._endpoint_changed, "endpoint")
        if endpoint is not None:
            self.endpoint_widget.use(endpoint)
        replace_in_cell(self)

    def _endpoint_changed(self, change: Any) -> None:
        endpoint = change["new"]
        for widget in (self.chat, self.compare, self.monitor):
            if widget is not None:
                widget.close()
        if endpoint is None:
            return
        self.chat = ChatWidget(endpoint, parameters=self.parameters)
        self.compare = CompareWidget([(endpoint, {"temperature": t}) for t in (0.0, 0.7, 1.2)],
                                     parameters=self.parameters)
        self.monitor = MonitorWidget(endpoint)
        self._chat_box.children = [self.chat]
        self._compare_box.children = [self.compare]
        self._monitor_box.children = [self.monitor]

    def close(self) -> None:
        for widget in (self.chat, self.compare, self.monitor, self.endpoint_widget, self.parameters):
            if widget is not None:
                widget.close()
        super().close()


def workbench(endpoint: Any = None, **endpoint_form: Any) -> Workbench:
    """The workbench: one widget with the Endpoint, Parameters, Chat, Compare and Monitor tabs.

    ``endpoint``: an endpoint to start with (else create one in the Endpoint tab); ``endpoint_form``: the
    form's defaults (``name``, ``repository``, ``type``, ``backend``).

    Example:
        >>> import tgi_nb
        >>> tgi_nb.workbench()          # doctest: +SKIP
    """
    return Workbench(endpoint, **endpoint_form)
