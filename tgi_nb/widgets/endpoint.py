"""``EndpointWidget``: create an endpoint from a form (or connect to one, or pick one that runs), follow its
status live and act on it (pause, resume, scale to zero, delete), with the code that does the same.

The widget subscribes to the endpoint's status (``endpoint.on_status_change``): a change is drawn from the
status machine's notifier thread as it happens, and nothing polls. The buttons offered are
:func:`~tgi_nb.endpoints.status.allowed_actions` of the status, the life cycle's own rule.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import Any, Callable, Optional

import ipywidgets as w
import traitlets

from tgi_nb.endpoints.status import allowed_actions

from .controls import button
from .lifecycle import Worker, replace_in_cell, request_parent, use_parent

DEFAULT_REPOSITORY = "HuggingFaceTB/SmolLM2-135M-Instruct"
LIMITS = ("MAX_INPUT_TOKENS", "MAX_TOTAL_TOKENS", "MAX_BATCH_PREFILL_TOKENS", "MAX_BATCH_TOTAL_TOKENS",
          "MAX_CONCURRENT_REQUESTS")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("thread", "process")
TYPES = ("public", "protected")
STATUS_COLORS = {"pending": "#6b7280", "initializing": "#d97706", "running": "#059669", "paused": "#2563eb",
                 "scaledToZero": "#7c3aed", "failed": "#dc2626", "deleted": "#6b7280", "none": "#9ca3af"}
ACTIONS = (("pause", "Pause", "pause"), ("resume", "Resume", "play"), ("scale_to_zero", "Scale to zero", "compress"),
           ("delete", "Delete", "trash"))


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


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def describe_limits(limits: dict[str, Any]) -> str:
    """An endpoint's limits in words, as the form shows them once it runs.

    Example:
        >>> describe_limits({"max_input_tokens": 4095, "max_total_tokens": 4096, "max_batch_total_tokens": 16384,
        ...                  "device": "cpu", "dtype": "float32", "kv_cache_dtype": "float32",
        ...                  "kv_cache_bytes": 1509949440, "weights_bytes": 538000000})
        'Prompts up to 4,095 tokens, 4,096 with the answer; 16,384 tokens in flight over all requests. On cpu in float32: weights 513.1 MiB, KV cache 1.4 GiB (float32).'
    """
    def count(key: str) -> str:
        value = limits.get(key)
        return f"{value:,}" if isinstance(value, int) else "?"

    text = (f"Prompts up to {count('max_input_tokens')} tokens, {count('max_total_tokens')} with the answer; "
            f"{count('max_batch_total_tokens')} tokens in flight over all requests.")
    memory = []
    if limits.get("weights_bytes"):
        memory.append(f"weights {_size(limits['weights_bytes'])}")
    if limits.get("kv_cache_bytes"):
        memory.append(f"KV cache {_size(limits['kv_cache_bytes'])} ({limits.get('kv_cache_dtype') or 'float32'})")
    where = " in ".join(str(limits[k]) for k in ("device", "dtype") if limits.get(k))
    if memory or where:
        text += f" On {where or 'this machine'}" + (": " + ", ".join(memory) if memory else "") + "."
    return text


class _LoadLog(logging.Handler):
    """Collects tgi_nb's log lines while a model loads: the steps the form shows as progress, each drawn as it
    comes (``on_line``).

    The loader's steps are INFO records, so while any load log is attached the ``tgi_nb`` logger lets INFO
    through: the first to attach lowers its level, the last to detach restores it, under one lock, whichever
    threads (and widgets) attach and detach.
    """

    _lock = threading.Lock()
    _attached = 0
    _saved_level = logging.NOTSET

    def __init__(self, on_line: Callable[[], None]) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.on_line = on_line
        self.started = time.monotonic()
        self._is_attached = False

    def attach(self) -> "_LoadLog":
        logger = logging.getLogger("tgi_nb")
        with _LoadLog._lock:
            if _LoadLog._attached == 0:
                _LoadLog._saved_level = logger.level
                if logger.getEffectiveLevel() > logging.INFO:
                    logger.setLevel(logging.INFO)
            _LoadLog._attached += 1
            self._is_attached = True
            logger.addHandler(self)
        return self

    def detach(self) -> None:
        logger = logging.getLogger("tgi_nb")
        with _LoadLog._lock:
            if not self._is_attached:
                return
            self._is_attached = False
            logger.removeHandler(self)
            _LoadLog._attached -= 1
            if _LoadLog._attached == 0:
                logger.setLevel(_LoadLog._saved_level)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a badly formatted record must not break loading
            return
        self.on_line()


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
    status = traitlets.Unicode("none", help="The endpoint's status as last drawn ('none' without an endpoint)")

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
                                layout=w.Layout(width="460px"))  # its own layout: hidden for a public endpoint
        self.limits = {name_: w.Text(description=name_, placeholder="default (fitted to the machine)",
                                     style=style, layout=wide) for name_ in LIMITS}
        self.backend = w.ToggleButtons(options=BACKENDS, value=backend, description="backend", style=style)
        self.dtype = w.Dropdown(options=DTYPES, value="auto", description="dtype", style=style)
        self.create_button = button("Create", "tgi-endpoint-create", self.create, style="primary", icon="play")
        self.url = w.Text(description="URL", placeholder="https://... (TGI, vLLM, Inference Endpoint)",
                          style=style, layout=wide)
        self.connect_token = w.Password(description="token", style=style, layout=wide)
        self.connect_button = button("Connect", "tgi-endpoint-connect", self.connect, style="primary", icon="link")
        self.running = w.Dropdown(options=[], description="running here", style=style, layout=wide)
        self.refresh_button = button("Refresh", "tgi-endpoint-refresh", self.refresh_running, icon="refresh")
        self.pick_button = button("Use", "tgi-endpoint-pick", self._pick, style="primary")
        self.badge = w.HTML()
        self.progress = w.HTML()
        self.warnings = w.HTML()
        self.links = w.HTML()
        self.error = w.HTML()
        self.action_buttons = {action: button(label, f"tgi-endpoint-{action.replace('_', '-')}",
                                              lambda action=action: self._act(action), icon=icon)
                               for action, label, icon in ACTIONS}
        self.code = w.HTML()
        for widget, css in ((self.name, "tgi-endpoint-name"), (self.repository, "tgi-endpoint-repository"),
                            (self.type, "tgi-endpoint-type"), (self.token, "tgi-endpoint-token"),
                            (self.backend, "tgi-endpoint-backend"), (self.dtype, "tgi-endpoint-dtype"),
                            (self.url, "tgi-endpoint-url-input"), (self.running, "tgi-endpoint-running"),
                            (self.badge, "tgi-endpoint-status"),
                            (self.progress, "tgi-endpoint-progress"), (self.warnings, "tgi-endpoint-warnings"),
                            (self.links, "tgi-endpoint-links"), (self.error, "tgi-endpoint-error"),
                            (self.code, "tgi-endpoint-code")):
            widget.add_class(css)
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

        for control in (self.name, self.repository, self.type, self.backend, self.dtype, *self.limits.values()):
            control.observe(lambda _: self._show_code(), "value")
        self.type.observe(lambda _: self._show_token(), "value")
        self._show_token()

        self._worker = Worker("endpoint-action")
        self._load_log: Optional[_LoadLog] = None
        self._unsubscribe: Optional[Callable[[], None]] = None
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

    def _show_token(self) -> None:
        """The token field only where one is needed: a protected endpoint."""
        self.token.layout.display = "" if self.type.value == "protected" else "none"

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
        """Follow ``endpoint`` (any ``InferenceEndpoint``): status badge, actions, links, redrawn on each change
        of its status."""
        self._follow(None)
        self.endpoint = endpoint
        self._follow(endpoint)
        if not endpoint.is_remote and endpoint.status != "deleted":
            endpoint.fetch()  # changes made before the subscription (free for a server in this kernel)
        self._show()

    def _follow(self, endpoint: Any) -> None:
        """Subscribe to ``endpoint``'s status changes, after unsubscribing from the previous one's."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        if endpoint is not None and endpoint.status != "deleted":  # a deleted one changes no more
            self._unsubscribe = endpoint.on_status_change(self._on_status)

    def _on_status(self, endpoint: Any, previous: str, new: str) -> None:
        use_parent(request_parent())  # the status machine's notifier thread: publish outside any subshell
        if endpoint is self.endpoint:  # not a change that came in while another endpoint was picked
            self._show()

    def _act(self, action: str) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            return
        if action == "resume":
            self._start_load_log()
        self._in_background(action, lambda: getattr(endpoint, action)())

    def _in_background(self, what: str, work: Callable[[], Any]) -> None:
        # Loading, stopping a server or reaching a URL can take seconds: never in the handler's thread.
        def run(_job: Any) -> None:
            self._show_error("")
            work()

        def ended(error: Optional[BaseException]) -> None:
            if error is not None:  # shown under the form; the widget keeps working
                self._show_error(f"{what}: {type(error).__name__}: {error}")
            self._show()

        self._worker.submit(run, on_end=ended)  # after the action in progress, if any: each click counts

    def wait_status(self, *statuses: str, timeout: float = 300) -> str:
        """Block until the drawn status is one of ``statuses`` (scripts and tests); returns it.

        Raises ``TimeoutError`` naming the last status after ``timeout`` seconds.
        """
        with self._status_cond:
            if not self._status_cond.wait_for(lambda: self.status in statuses, timeout):
                raise TimeoutError(f"status is {self.status!r}, not one of {statuses}, after {timeout} s")
            return self.status

    def close(self) -> None:
        """Stop following the endpoint (it keeps running: ``endpoint.delete()`` stops it)."""
        if hasattr(self, "_worker"):  # not when __init__ failed (ipywidgets closes in __del__)
            self._follow(None)
            self._worker.close()
            self._stop_load_log()
        super().close()

    # ------------------------------------------------------------------------------------------------ status
    def _start_load_log(self) -> None:
        self._stop_load_log()
        self._load_log = _LoadLog(self._step_logged).attach()

    def _stop_load_log(self) -> None:
        log, self._load_log = self._load_log, None
        if log is not None:
            log.detach()

    def _show(self) -> None:
        """Draw the endpoint as its fields are now (a status change refreshed them)."""
        endpoint = self.endpoint
        with self._status_cond:  # drawn before waiters wake: wait_status() returns on what is shown
            self.status = endpoint.status if endpoint is not None else "none"
            self._render()
            self._status_cond.notify_all()
        if self.status in ("running", "failed", "paused", "deleted"):
            self._stop_load_log()

    def _render(self) -> None:
        endpoint = self.endpoint
        status = self.status
        color = STATUS_COLORS.get(status, "#6b7280")
        label = "no endpoint" if endpoint is None else f"{html.escape(endpoint.name)}: {status}"
        self.badge.value = (f"<span class='tgi-endpoint-badge' data-status='{status}' style='background:{color};"
                            f"color:white;padding:3px 10px;border-radius:10px;font-weight:600'>{label}</span>")
        allowed = allowed_actions(status) if endpoint is not None else ()
        for action, action_button in self.action_buttons.items():
            action_button.disabled = action not in allowed
        self._show_progress()
        if endpoint is None:
            self.links.value = self.warnings.value = ""
            return
        if endpoint.url and status not in ("deleted",):
            browser = endpoint.browser_url or endpoint.url
            self.links.value = (f"URL: <code class='tgi-endpoint-url'>{html.escape(endpoint.url)}</code> &middot; "
                                f"<a class='tgi-endpoint-docs' href='{html.escape(browser)}/docs' target='_blank'>"
                                f"API docs (/docs)</a>")
        else:
            self.links.value = ""
        found = endpoint.raw.get("tgi_nb", {}).get("warnings") or []
        self.warnings.value = "".join(f"<div style='color:#b45309'>&#9888; {html.escape(m)}</div>" for m in found)

    def _step_logged(self) -> None:
        use_parent(request_parent())  # the loading thread, maybe the endpoint's own: publish outside any subshell
        with self._status_cond:  # not drawn over a change of status being drawn
            self._show_progress()

    def _show_progress(self) -> None:
        """The load's steps so far (drawn again by each new step), then why it failed or the limits it got."""
        endpoint, status, log = self.endpoint, self.status, self._load_log
        if endpoint is None:
            self.progress.value = ""
            return
        lines = []
        if log is not None:
            if status in ("pending", "initializing"):
                lines.append(f"{status}: {time.monotonic() - log.started:.0f} s")
            lines += [html.escape(step) for step in list(dict.fromkeys(log.lines))[-6:]]
        message = endpoint.raw.get("status", {}).get("message")
        if status == "failed" and message:
            lines.append(f"<b style='color:#dc2626'>{html.escape(message)}</b>")
        elif status == "running" and endpoint.limits:
            lines.append(html.escape(describe_limits(endpoint.limits)))
        self.progress.value = f"<div style='font-size:12px;line-height:1.4'>{'<br>'.join(lines)}</div>"

    def _show_error(self, message: str) -> None:
        self.error.value = f"<div style='color:#dc2626'>{html.escape(message)}</div>" if message else ""
