"""``EndpointWidget``: create an endpoint from a form (or connect to one, or pick one that runs), follow its
status live and act on it (pause, resume, scale to zero, delete), with the code that does the same.

The status is polled from a background thread (``endpoint.fetch()`` costs nothing on a local endpoint); the
poller is the only place to change when endpoints publish their transitions as callbacks.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import Any, Optional

import ipywidgets as w
import traitlets

from .lifecycle import Poller, replace_in_cell

DEFAULT_REPOSITORY = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIMITS = ("MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_TOTAL_TOKENS",
          "MAX_CONCURRENT_REQUESTS")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("thread", "process")
TYPES = ("public", "protected")
STATUS_COLORS = {"pending": "#6b7280", "initializing": "#d97706", "running": "#059669", "paused": "#2563eb",
                 "scaledToZero": "#7c3aed", "failed": "#dc2626", "deleted": "#6b7280", "none": "#9ca3af"}
POLL_SECONDS = 0.5


def cached_models() -> list[str]:
    """The bundled default model, then the model repositories in the Hugging Face cache.

    Example:
        >>> cached_models()[0]
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    models = [DEFAULT_REPOSITORY]
    try:
        from huggingface_hub import scan_cache_dir

        models += sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # noqa: BLE001 - no cache folder, or one huggingface_hub cannot read: offer the default
        pass
    return list(dict.fromkeys(models))


def creation_code(name: str, repository: str, type_: str, env: dict[str, str], backend: str) -> str:
    """The ``create_inference_endpoint`` call a form stands for, as Python source.

    Example:
        >>> print(creation_code("demo", "HuggingFaceTB/SmolLM2-135M-Instruct", "public", {}, "thread"))
        from tgi_nb import create_inference_endpoint
        <BLANKLINE>
        endpoint = create_inference_endpoint(
            'demo',
            repository='HuggingFaceTB/SmolLM2-135M-Instruct',
            type='public',
            custom_image={'health_route': '/health', 'env': {'MODEL_ID': '/repository'}},
        )
        endpoint.wait()
    """
    lines = ["from tgi_nb import create_inference_endpoint"]
    if type_ != "public":
        lines = ["import os", *lines]
    lines += ["", "endpoint = create_inference_endpoint(", f"    {name!r},", f"    repository={repository!r},",
              f"    type={type_!r},",
              f"    custom_image={{'health_route': '/health', 'env': {({**env, 'MODEL_ID': '/repository'})!r}}},"]
    if type_ != "public":
        lines.append("    token=os.environ.get('HF_TOKEN', 'hf_local'),")
    if backend != "thread":
        lines.append(f"    backend={backend!r},")
    lines += [")", "endpoint.wait()"]
    return "\n".join(lines)


class _LoadLog(logging.Handler):
    """Collects tgi_nb's log lines while a model loads: the steps the form shows as progress."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a badly formatted record must not break loading
            pass


class EndpointWidget(w.VBox):
    """A form for ``create_inference_endpoint`` (or ``connect``), a live status badge and the endpoint's actions.

    ``endpoint`` (observable) is the ``InferenceEndpoint`` the widget made, connected to or picked.

    Example:
        >>> from tgi_nb.widgets import EndpointWidget
        >>> form = EndpointWidget()
        >>> form.name.value, form.repository.value
        ('smollm2', 'HuggingFaceTB/SmolLM2-135M-Instruct')
        >>> form.create()                                # what the Create button does   # doctest: +SKIP
        >>> form.wait_status("running", timeout=300)                                    # doctest: +SKIP
        >>> form.endpoint.url                                                           # doctest: +SKIP
        'http://127.0.0.1:41234'
        >>> form.close()    # stops following the endpoint (it keeps running)
    """

    endpoint = traitlets.Any(None, allow_none=True, help="The InferenceEndpoint this widget made or picked")
    status = traitlets.Unicode("none", help="The endpoint's status as last polled")

    def __init__(self, endpoint: Any = None, *, name: str = "smollm2", repository: str = DEFAULT_REPOSITORY,
                 type: str = "public", backend: str = "thread"):
        style = {"description_width": "150px"}
        wide = w.Layout(width="460px")
        self.name = w.Text(value=name, description="name", style=style, layout=wide)
        self.repository = w.Combobox(value=repository, options=cached_models(), ensure_option=False,
                                     description="repository", placeholder="Hub id, folder or .gguf file",
                                     style=style, layout=wide)
        self.type = w.ToggleButtons(options=TYPES, value=type, description="type", style=style)
        self.token = w.Password(description="token", placeholder="empty: a random one (endpoint.token)", style=style,
                                layout=wide)
        self.limits = {name_: w.Text(description=name_, placeholder="default (fitted to the machine)",
                                     style=style, layout=wide) for name_ in LIMITS}
        self.backend = w.ToggleButtons(options=BACKENDS, value=backend, description="backend", style=style)
        self.dtype = w.Dropdown(options=DTYPES, value="auto", description="dtype", style=style)
        self.create_button = w.Button(description="Create", button_style="primary", icon="play")
        self.url = w.Text(description="URL", placeholder="https://... (TGI, vLLM, Inference Endpoint)",
                          style=style, layout=wide)
        self.connect_token = w.Password(description="token", style=style, layout=wide)
        self.connect_button = w.Button(description="Connect", button_style="primary", icon="link")
        self.running = w.Dropdown(options=[], description="running here", style=style, layout=wide)
        self.refresh_button = w.Button(description="Refresh", icon="refresh")
        self.pick_button = w.Button(description="Use", button_style="primary")
        self.badge = w.HTML()
        self.progress = w.HTML()
        self.warnings = w.HTML()
        self.links = w.HTML()
        self.error = w.HTML()
        self.action_buttons = {action: w.Button(description=label, icon=icon, layout=w.Layout(width="auto"))
                               for action, label, icon in (("pause", "Pause", "pause"), ("resume", "Resume", "play"),
                                                           ("scale_to_zero", "Scale to zero", "compress"),
                                                           ("delete", "Delete", "trash"))}
        self.code = w.HTML()
        for widget, css in ((self.name, "tgi-endpoint-name"), (self.repository, "tgi-endpoint-repository"),
                            (self.type, "tgi-endpoint-type"), (self.token, "tgi-endpoint-token"),
                            (self.backend, "tgi-endpoint-backend"), (self.dtype, "tgi-endpoint-dtype"),
                            (self.create_button, "tgi-endpoint-create"), (self.url, "tgi-endpoint-url-input"),
                            (self.connect_button, "tgi-endpoint-connect"), (self.running, "tgi-endpoint-running"),
                            (self.pick_button, "tgi-endpoint-pick"), (self.badge, "tgi-endpoint-status"),
                            (self.progress, "tgi-endpoint-progress"), (self.warnings, "tgi-endpoint-warnings"),
                            (self.links, "tgi-endpoint-links"), (self.error, "tgi-endpoint-error"),
                            (self.code, "tgi-endpoint-code")):
            widget.add_class(css)
        for action, button in self.action_buttons.items():
            button.add_class(f"tgi-endpoint-{action.replace('_', '-')}")
            button.on_click(lambda _, action=action: self._act(action))
        for name_, text in self.limits.items():
            text.add_class(f"tgi-endpoint-{name_.lower().replace('_', '-')}")

        limits_box = w.Accordion([w.VBox(list(self.limits.values()))], titles=("Limits (TGI launcher variables)",),
                                 selected_index=None, layout=w.Layout(width="480px"))
        create_form = w.VBox([self.name, self.repository, self.type, self.token, limits_box, self.backend,
                              self.dtype, self.create_button])
        connect_form = w.VBox([self.url, self.connect_token, self.connect_button])
        pick_form = w.VBox([self.running, w.HBox([self.refresh_button, self.pick_button])])
        self.forms = w.Tab([create_form, connect_form, pick_form], titles=("Create", "Connect", "Running"))
        status_box = w.VBox([w.HBox([self.badge, *self.action_buttons.values()]), self.progress, self.links,
                             self.warnings, self.error, self.code])
        super().__init__([self.forms, status_box])
        self.add_class("tgi-endpoint")

        self.create_button.on_click(lambda _: self.create())
        self.connect_button.on_click(lambda _: self.connect())
        self.refresh_button.on_click(lambda _: self.refresh_running())
        self.pick_button.on_click(lambda _: self._pick())
        for control in (self.name, self.repository, self.type, self.backend, self.dtype, *self.limits.values()):
            control.observe(lambda _: self._show_code(), "value")

        self._busy = threading.Lock()
        self._load_log: Optional[_LoadLog] = None
        self._load_started: Optional[float] = None
        self._poller: Optional[Poller] = None
        self._status_cond = threading.Condition()
        self._show_code()
        self._render()
        self.refresh_running()
        if endpoint is not None:
            self.use(endpoint)
        replace_in_cell(self)

    # ------------------------------------------------------------------------------------------------ form
    def form_arguments(self) -> dict[str, Any]:
        """``create_inference_endpoint``'s keyword arguments from the form.

        Raises ``ValueError`` naming the field when a limit is not a positive integer.
        """
        env = {}
        for name, text in self.limits.items():
            value = text.value.strip()
            if not value:
                continue
            if not value.isdigit() or int(value) <= 0:
                raise ValueError(f"{name}: must be a positive integer or empty (default), got {value!r}")
            env[name] = value
        if self.dtype.value != "auto":
            env["DTYPE"] = self.dtype.value
        kwargs: dict[str, Any] = dict(repository=self.repository.value.strip() or DEFAULT_REPOSITORY,
                                      type=self.type.value, backend=self.backend.value,
                                      custom_image={"health_route": "/health",
                                                    "env": {**env, "MODEL_ID": "/repository"}})
        if self.type.value != "public":
            kwargs["token"] = self.token.value or None
        return kwargs

    def _show_code(self) -> None:
        try:
            kwargs = self.form_arguments()
        except ValueError as exc:
            self._show_error(str(exc))
            return
        env = {k: v for k, v in kwargs["custom_image"]["env"].items() if k != "MODEL_ID"}
        code = creation_code(self.name.value.strip(), kwargs["repository"], kwargs["type"], env, kwargs["backend"])
        self.code.value = f"<details open><summary>Python</summary><pre>{html.escape(code)}</pre></details>"

    # ------------------------------------------------------------------------------------------------ actions
    def create(self) -> None:
        """Create (or re-create) the endpoint the form describes; returns at once, the status follows live."""
        from tgi_nb.endpoints import create_inference_endpoint

        try:
            kwargs = self.form_arguments()
        except ValueError as exc:
            self._show_error(str(exc))
            return
        name = self.name.value.strip()
        self._start_load_log()
        self._in_background("create", lambda: self.use(create_inference_endpoint(name, **kwargs)))

    def connect(self) -> None:
        """Connect to the server at the URL field (``tgi_nb.connect``); returns at once."""
        from tgi_nb.endpoints import connect

        url, token = self.url.value.strip(), self.connect_token.value or False
        self.code.value = ("<details open><summary>Python</summary><pre>from tgi_nb import connect\n\nendpoint = "
                           f"connect({html.escape(repr(url))}, token=...)\nendpoint.wait()</pre></details>")
        self._in_background("connect", lambda: self.use(connect(url, token=token)))

    def refresh_running(self) -> None:
        """List the endpoints of this kernel in the "Running" tab."""
        from tgi_nb.endpoints import list_inference_endpoints

        self._endpoints = {e.name: e for e in list_inference_endpoints()}
        self.running.options = [(f"{e.name} ({e.status}, {e.repository})", e.name) for e in self._endpoints.values()]

    def _pick(self) -> None:
        if self.running.value is not None:
            self.use(self._endpoints[self.running.value])

    def use(self, endpoint: Any) -> None:
        """Follow ``endpoint`` (any ``InferenceEndpoint``): status badge, actions, links."""
        if self._poller is not None:
            self._poller.stop(join=False)
        self.endpoint = endpoint
        self._poller = Poller(POLL_SECONDS, self._poll, name=f"endpoint-{endpoint.name}").start()

    def _act(self, action: str) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            return
        if action == "resume":
            self._start_load_log()
        self._in_background(action, lambda: getattr(endpoint, action)())

    def _in_background(self, what: str, work) -> None:
        # Loading, stopping a server or reaching a URL can take seconds: never in the handler's thread.
        if not self._busy.acquire(blocking=False):
            self._show_error("busy: the previous action is still running")
            return

        def run() -> None:
            try:
                self._show_error("")
                work()
            except Exception as exc:  # noqa: BLE001 - shown under the form; the widget keeps working
                self._show_error(f"{what}: {type(exc).__name__}: {exc}")
            finally:
                self._busy.release()
                self._poll()

        threading.Thread(target=run, name=f"tgi_nb-endpoint-{what}", daemon=True).start()

    def wait_status(self, *statuses: str, timeout: float = 300) -> str:
        """Block until the polled status is one of ``statuses`` (scripts and tests); returns it.

        Raises ``TimeoutError`` naming the last status after ``timeout`` seconds.
        """
        with self._status_cond:
            if not self._status_cond.wait_for(lambda: self.status in statuses, timeout):
                raise TimeoutError(f"status is {self.status!r}, not one of {statuses}, after {timeout} s")
            return self.status

    def close(self) -> None:
        """Stop following the endpoint (it keeps running: ``endpoint.delete()`` stops it)."""
        if getattr(self, "_poller", None) is not None:
            self._poller.stop()
        self._stop_load_log()
        super().close()

    # ------------------------------------------------------------------------------------------------ status
    def _start_load_log(self) -> None:
        self._stop_load_log()
        self._load_log = _LoadLog()
        self._load_started = time.monotonic()
        logger = logging.getLogger("tgi_nb")
        self._saved_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the loader's steps are INFO records; restored once loaded
        logger.addHandler(self._load_log)

    def _stop_load_log(self) -> None:
        if getattr(self, "_load_log", None) is not None:
            logger = logging.getLogger("tgi_nb")
            logger.removeHandler(self._load_log)
            logger.setLevel(self._saved_level)
            self._load_log = None

    def _poll(self) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            return
        if endpoint.status != "deleted":
            endpoint.fetch()
        with self._status_cond:  # drawn before waiters wake: wait_status() returns on what is shown
            self.status = endpoint.status
            self._render()
            self._status_cond.notify_all()
        if self.status in ("running", "failed", "paused", "deleted"):
            self._stop_load_log()
        if self.status == "deleted" and self._poller is not None:
            self._poller.stop(join=False)

    def _render(self) -> None:
        endpoint = self.endpoint
        status = self.status
        color = STATUS_COLORS.get(status, "#6b7280")
        label = "no endpoint" if endpoint is None else f"{html.escape(endpoint.name)}: {status}"
        self.badge.value = (f"<span class='tgi-endpoint-badge' data-status='{status}' style='background:{color};"
                            f"color:white;padding:3px 10px;border-radius:10px;font-weight:600'>{label}</span>")
        enabled = {"pause": status in ("running", "initializing", "scaledToZero"),
                   "resume": status in ("paused", "scaledToZero", "failed"),
                   "scale_to_zero": status in ("running", "initializing"),
                   "delete": endpoint is not None and status != "deleted"}
        for action, button in self.action_buttons.items():
            button.disabled = not enabled[action]
        if endpoint is None:
            self.progress.value = self.links.value = self.warnings.value = ""
            return
        message = endpoint.raw.get("status", {}).get("message")
        steps = list(self._load_log.lines) if self._load_log is not None else []
        lines = []
        if status in ("pending", "initializing") and self._load_started is not None:
            lines.append(f"{status}: {time.monotonic() - self._load_started:.0f} s")
        lines += [html.escape(step) for step in list(dict.fromkeys(steps))[-6:]]
        if status == "failed" and message:
            lines.append(f"<b style='color:#dc2626'>{html.escape(message)}</b>")
        elif status == "running":
            limits = endpoint.limits or {}
            if limits:
                lines.append("limits: " + ", ".join(f"{k}={v}" for k, v in limits.items()))
        self.progress.value = f"<div style='font-size:12px;line-height:1.4'>{'<br>'.join(lines)}</div>"
        if endpoint.url and status not in ("deleted",):
            browser = endpoint.browser_url or endpoint.url
            self.links.value = (f"URL: <code class='tgi-endpoint-url'>{html.escape(endpoint.url)}</code> &middot; "
                                f"<a class='tgi-endpoint-docs' href='{html.escape(browser)}/docs' target='_blank'>"
                                f"API docs (/docs)</a>")
        else:
            self.links.value = ""
        found = endpoint.raw.get("tgi_nb", {}).get("warnings") or []
        self.warnings.value = "".join(f"<div style='color:#b45309'>&#9888; {html.escape(m)}</div>" for m in found)

    def _show_error(self, message: str) -> None:
        self.error.value = f"<div style='color:#dc2626'>{html.escape(message)}</div>" if message else ""
