"""``ParametersWidget``: sampling controls whose ``params`` is a request body in OpenAI's names.

``params`` holds max_tokens and what differs from the server's defaults, so the code it shows is the shortest
call that does the same. Parameters that OpenAI's API lacks but TGI and vLLM accept (top_k, min_p, repetition_penalty)
go through the ``openai`` client's ``extra_body``, as users of those servers already write them. An endpoint's
own defaults (the model's recommended settings, ``/info``'s ``generation_config``) become the widget's starting
values with :meth:`ParametersWidget.use_endpoint_defaults`, and its URL the one in the curl command.
"""

from __future__ import annotations

import html
import json
import shlex
from typing import Any, Optional

import ipywidgets as w
import traitlets

from .controls import styled

# Body fields the openai client takes as keyword arguments; the rest of ``params`` goes to extra_body.
OPENAI_FIELDS = frozenset({"temperature", "top_p", "max_tokens", "seed", "stop", "frequency_penalty",
                           "presence_penalty", "logprobs", "top_logprobs", "response_format"})
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_DEFAULT_SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}},
                              "required": ["answer"]}, indent=1)


def split_openai_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as keyword arguments of ``client.chat.completions.create``: non-OpenAI fields in extra_body.

    Example:
        >>> split_openai_kwargs({"temperature": 0.2, "top_k": 5})
        {'temperature': 0.2, 'extra_body': {'top_k': 5}}
    """
    kwargs = {k: v for k, v in params.items() if k in OPENAI_FIELDS}
    extra = {k: v for k, v in params.items() if k not in OPENAI_FIELDS}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def python_call(params: dict[str, Any], messages_expr: str = "messages", model: str = "tgi",
                stream: bool = True) -> str:
    """The ``client.chat.completions.create(...)`` call these parameters stand for, as Python source.

    Example:
        >>> print(python_call({"temperature": 0.5}))
        stream = client.chat.completions.create(
            model='tgi',
            messages=messages,
            temperature=0.5,
            stream=True,
        )
    """
    lines = [f"    model={model!r},", f"    messages={messages_expr},"]
    lines += [f"    {k}={v!r}," for k, v in split_openai_kwargs(params).items()]
    if stream:
        lines.append("    stream=True,")
    head = "stream" if stream else "response"
    return f"{head} = client.chat.completions.create(\n" + "\n".join(lines) + "\n)"


DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


def curl_command(params: dict[str, Any], base_url: str = DEFAULT_BASE_URL, model: str = "tgi") -> str:
    """The same request as a curl command (``$TOKEN`` for the bearer token), quoted for a POSIX shell whatever
    the values hold (a ``'`` in a stop string...).

    Example:
        >>> curl_command({"max_tokens": 8}).splitlines()[0]
        'curl http://127.0.0.1:8080/v1/chat/completions \\\\'
        >>> import shlex
        >>> json.loads(shlex.split(curl_command({"stop": ["it's"]}))[-1])["stop"]   # what the shell passes on
        ["it's"]
    """
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], **params, "stream": True}
    return (f"curl {shlex.quote(base_url + '/chat/completions')} \\\n  -H 'Content-Type: application/json' "
            f"-H \"Authorization: Bearer $TOKEN\" \\\n  -d {shlex.quote(json.dumps(body))}")


class ParametersWidget(w.VBox):
    """Controls for a chat request; ``params`` (observable) is the body in OpenAI's names.

    Example:
        >>> from tgi_nb.widgets import ParametersWidget
        >>> p = ParametersWidget(temperature=0.0, max_tokens=32)
        >>> p.params
        {'temperature': 0.0, 'max_tokens': 32}
        >>> ParametersWidget().params
        {'max_tokens': 256}
        >>> p.set(seed=7, stop=["\\n\\n"]); sorted(p.params)
        ['max_tokens', 'seed', 'stop', 'temperature']
        >>> p.observe(lambda change: print(change["new"]["top_k"]), "params"); p.set(top_k=5)
        5
    """

    params = traitlets.Dict(help="The request body in OpenAI's names (only values that differ from defaults)")
    system_prompt = traitlets.Unicode("", help="The system message the chat starts with ('' for none)")
    base_url = traitlets.Unicode(DEFAULT_BASE_URL, help="The /v1 URL the curl command shows")

    # name -> (default, control factory); a value equal to its default is left out of ``params``.
    DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 256,
                                "seed": None, "stop": [], "frequency_penalty": 0.0, "presence_penalty": 0.0,
                                "repetition_penalty": 1.0, "logprobs": False, "top_logprobs": 0,
                                "response_format": "text"}

    def __init__(self, system_prompt: str = "", json_schema: Optional[dict] = None, **values: Any):
        unknown = sorted(set(values) - set(self.DEFAULTS))
        if unknown:
            raise TypeError(f"ParametersWidget: unknown parameter {unknown[0]!r}; "
                            f"allowed: {', '.join(self.DEFAULTS)}")
        self.defaults = dict(self.DEFAULTS)  # the server's: an endpoint's own replace OpenAI's (use_endpoint_defaults)
        style = {"description_width": "130px"}
        # Two columns side by side when there is room, one under the other when not: never a clipped control.
        layout = w.Layout(width="400px", max_width="100%")

        def slider(cls, name, lo, hi, step, desc):
            return cls(value=self.DEFAULTS[name], min=lo, max=hi, step=step, description=desc, style=style,
                       layout=layout, continuous_update=False)

        self.controls: dict[str, w.Widget] = {
            "temperature": slider(w.FloatSlider, "temperature", 0.0, 2.0, 0.05, "temperature"),
            "top_p": slider(w.FloatSlider, "top_p", 0.0, 1.0, 0.01, "top_p"),
            "top_k": w.BoundedIntText(value=0, min=0, max=1000, description="top_k (0: off)", style=style,
                                      layout=layout),
            "min_p": slider(w.FloatSlider, "min_p", 0.0, 1.0, 0.01, "min_p"),
            "max_tokens": slider(w.IntSlider, "max_tokens", 1, 4096, 1, "max_tokens"),
            "seed": w.Text(value="", placeholder="empty: random", description="seed", style=style,
                           layout=layout),
            "stop": w.TagsInput(value=[], allow_duplicates=False, layout=layout),
            "frequency_penalty": slider(w.FloatSlider, "frequency_penalty", -2.0, 2.0, 0.05, "frequency_penalty"),
            "presence_penalty": slider(w.FloatSlider, "presence_penalty", -2.0, 2.0, 0.05, "presence_penalty"),
            "repetition_penalty": slider(w.FloatSlider, "repetition_penalty", 0.5, 2.0, 0.01,
                                         "repetition_penalty"),
            "logprobs": w.Checkbox(value=False, description="logprobs", style=style, indent=False),
            "top_logprobs": w.BoundedIntText(value=0, min=0, max=20, description="top_logprobs", style=style,
                                             layout=layout),
            "response_format": w.Dropdown(options=RESPONSE_FORMATS, value="text", description="response_format",
                                          style=style, layout=layout),
        }
        for name, control in self.controls.items():
            control.add_class(f"tgi-param-{name.replace('_', '-')}")
        self.schema = w.Textarea(value=json.dumps(json_schema, indent=1) if json_schema else _DEFAULT_SCHEMA,
                                 description="JSON schema", style=style,
                                 layout=w.Layout(width="400px", max_width="100%", height="90px"))
        self.system = w.Textarea(value=system_prompt, placeholder="You are a helpful assistant.",
                                 description="system prompt", style=style,
                                 layout=w.Layout(width="816px", max_width="100%", height="60px"))
        self.system.add_class("tgi-param-system")
        self.error = w.HTML()
        self.error.add_class("tgi-param-error")
        self.code = w.HTML()
        self.code.add_class("tgi-param-code")
        stop_row = w.HBox([w.Label("stop strings", layout=w.Layout(width="130px")), self.controls["stop"]])
        left = [self.controls[n] for n in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed")]
        right = [stop_row] + [self.controls[n] for n in ("frequency_penalty", "presence_penalty",
                                                         "repetition_penalty", "logprobs", "top_logprobs",
                                                         "response_format")] + [self.schema]
        column = w.Layout(width="410px", max_width="100%", overflow="visible")
        columns = w.HBox([w.VBox(left, layout=column), w.VBox(right, layout=column)],
                         layout=w.Layout(flex_flow="row wrap", width="100%", overflow="visible"))
        self.defaults_note = styled(w.HTML(), "tgi-param-defaults")
        super().__init__([self.defaults_note, columns, self.system, self.error, self.code],
                         layout=w.Layout(overflow="visible"))
        self.add_class("tgi-parameters")
        for control in [*self.controls.values(), self.schema]:
            control.observe(self._changed, "value")
        self.system.observe(self._changed, "value")
        self.observe(self._changed, "base_url")
        self.set(**values)
        self._changed()

    # ------------------------------------------------------------------------------------------------ values
    def set(self, **values: Any) -> None:
        """Set controls by parameter name (``seed=None`` clears the seed).

        Raises ``ValueError`` naming the field and its allowed values when a value is out of range.
        """
        for name, value in values.items():
            control = self.controls.get(name)
            if control is None:
                raise TypeError(f"unknown parameter {name!r}; allowed: {', '.join(self.DEFAULTS)}")
            if name == "seed":
                value = "" if value is None else str(int(value))
            elif name == "stop":
                value = [value] if isinstance(value, str) else list(value or [])
            elif name == "response_format" and value not in RESPONSE_FORMATS:
                raise ValueError(f"response_format: must be one of {', '.join(RESPONSE_FORMATS)}, got {value!r}")
            elif hasattr(control, "min") and not control.min <= value <= control.max:
                raise ValueError(f"{name}: must be between {control.min} and {control.max}, got {value!r}")
            control.value = value

    def _read(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for name, control in self.controls.items():
            value = control.value
            if name == "seed":
                value = int(value) if value.strip().lstrip("-").isdigit() else None
            elif name == "stop":
                value = list(value)
            elif isinstance(value, float):
                value = round(value, 4)  # slider steps are decimal; 0.7000000000000001 would leak into the code
            if value == self.defaults[name] and name != "max_tokens":
                continue  # max_tokens always: the server's own default is "until the context is full"
            if name == "response_format":
                value = {"type": value}
                if value["type"] == "json_schema":
                    value["json_schema"] = {"name": "answer", "schema": json.loads(self.schema.value)}
            params[name] = value
        if params.get("top_logprobs"):
            params["logprobs"] = True  # OpenAI refuses top_logprobs without logprobs
        return params

    def use_endpoint_defaults(self, defaults: dict[str, Any], base_url: Optional[str] = None) -> None:
        """Start from an endpoint's own defaults (``/info``'s ``generation_config``: what it applies when a
        request leaves a setting out): the controls the user has not moved go to them, and ``params`` leaves
        them out while they are unchanged. ``base_url``: the endpoint's ``/v1`` URL, for the curl command.

        Example:
            >>> p = ParametersWidget()
            >>> p.use_endpoint_defaults({"temperature": 0.2, "top_p": 0.9}, "http://127.0.0.1:9000/v1")
            >>> p.controls["temperature"].value, p.params, p.base_url
            (0.2, {'max_tokens': 256}, 'http://127.0.0.1:9000/v1')
        """
        known = {}
        with self.hold_trait_notifications():
            for name, value in defaults.items():
                if name in self.controls and name not in ("seed", "stop", "max_tokens"):
                    if self.controls[name].value != self.defaults[name]:
                        known[name] = value  # the user moved it already: their value stays, and is sent
                        continue
                    try:
                        self.set(**{name: value})
                    except (TypeError, ValueError):  # beyond the control's range: left as the server has it
                        continue
                    known[name] = value
            self.defaults = {**self.DEFAULTS, **known}
            if base_url:
                self.base_url = base_url
        self.defaults_note.value = (
            "<div style='font-size:12px'>Starting from the endpoint's defaults (the model's recommended "
            f"settings): {html.escape(', '.join(f'{k}={v}' for k, v in known.items()))}</div>" if known else "")
        self._changed()

    def _changed(self, change: Any = None) -> None:
        # The JSON schema box only where it is used.
        self.schema.layout.display = "" if self.controls["response_format"].value == "json_schema" else "none"
        try:
            params = self._read()
        except json.JSONDecodeError as exc:
            self.show_error(f"JSON schema: not valid JSON ({exc})")
            return
        self.show_error(None)
        self.system_prompt = self.system.value.strip()
        self.params = params
        messages = "messages"
        if self.system_prompt:
            messages = f"[{{'role': 'system', 'content': {self.system_prompt!r}}}, *messages]"
        code = python_call(params, messages)
        self.code.value = ("<details><summary>Python / curl</summary>"
                           f"<pre>{html.escape(code)}</pre><pre>{html.escape(curl_command(params, self.base_url))}</pre>"
                           "</details>")

    def show_error(self, message: Optional[str]) -> None:
        """Show a refused value (the server's 400 message) under the controls; None clears it."""
        self.error.value = "" if not message else (
            f"<div style='color:#b91c1c'>&#9888; {html.escape(message)}</div>")

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``client.chat.completions.create`` (``extra_body`` for non-OpenAI fields)."""
        return split_openai_kwargs(self.params)
