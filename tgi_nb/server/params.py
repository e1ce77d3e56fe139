"""Request parameters shared by the OpenAI and TGI routes: validation (lone surrogates, logit_bias, stop),
tokenizing prompts within the limits, max_new_tokens, building :class:`~tgi_nb.engine.SamplingParams` with
errors renamed to the route's field names, response ids.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Optional, Union

from tgi_nb.engine import SamplingParams, ValidationError
from tgi_nb.engine.capacity import ContextLengthError, RequestLimits
from tgi_nb.engine.interface import GenerationEngine

from .errors import BadRequest, ContextLengthExceeded

logger = logging.getLogger("tgi_nb.server")


def new_id(prefix: str) -> str:
    """An OpenAI-style id, e.g. ``chatcmpl-3f2a...``.

    Example:
        >>> new_id("cmpl").startswith("cmpl-")
        True
    """
    return f"{prefix}-{uuid.uuid4().hex}"


def log_ignored(route: str, fields: list[str]) -> None:
    if fields:
        logger.warning("%s: ignoring unknown field%s %s", route, "s" if len(fields) > 1 else "", ", ".join(fields))


# ----------------------------------------------------------------------------------------------
# Parameters and limits
# ----------------------------------------------------------------------------------------------

def bad_request(exc: ValidationError, names: dict[str, str]) -> BadRequest:
    """``exc`` as a :class:`BadRequest` naming the field as the client called it (``names``: engine field
    -> API field), the message's leading ``field:`` renamed too."""
    field = names.get(exc.field, exc.field)
    message = str(exc)
    if message.startswith(f"{exc.field}:"):
        message = f"{field}:{message[len(exc.field) + 1:]}"
    return BadRequest(message, param=field)


def tokenize(engine: GenerationEngine, prompt: Union[str, list[int]], param: str,
             add_special_tokens: bool = False) -> list[int]:
    """Token ids the engine will see for ``prompt``. Chat prompts come from a template that already has
    the special tokens; raw prompts (completions, /generate) get the tokenizer's own (a BOS for Llama
    models), as vLLM and TGI add them."""
    try:
        ids = engine.tokenize(prompt, add_special_tokens=add_special_tokens)
    except ValidationError as exc:
        raise bad_request(exc, {"prompt": param}) from exc
    if not ids:
        raise BadRequest(f"{param}: must contain at least one token", param=param)
    return ids


def resolve_max_new_tokens(requested: Optional[int], prompt_len: int, limits: RequestLimits, *,
                           field: str = "max_tokens", prompt_field: str = "messages") -> int:
    """``requested`` checked against the limits (:meth:`RequestLimits.max_new_tokens` decides), or (when None)
    everything the context has left; a prompt or total too long is OpenAI's ``context_length_exceeded``.

    Example:
        >>> resolve_max_new_tokens(None, 100, RequestLimits(1024, 2048))
        1948
        >>> resolve_max_new_tokens(2000, 100, RequestLimits(1024, 2048))
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.ContextLengthExceeded: This model's maximum context length is 2048 tokens. However, you requested 2100 tokens (100 in the messages, 2000 in the completion). Please reduce the length of the messages or completion.
    """
    try:
        return limits.max_new_tokens(prompt_len, requested)
    except ContextLengthError as exc:
        if exc.limit == "max_input_tokens":
            raise ContextLengthExceeded(
                f"This model's maximum input length is {exc.value} tokens (max_input_tokens). "
                f"However, your {prompt_field} resulted in {prompt_len} tokens. "
                f"Please reduce the length of the {prompt_field}.", param=prompt_field) from None
        raise ContextLengthExceeded(
            f"This model's maximum context length is {exc.value} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_field}, {requested} in the completion). "
            f"Please reduce the length of the {prompt_field} or completion.", param=field) from None


def make_sampling_params(names: dict[str, str], **kwargs: Any) -> SamplingParams:
    """``SamplingParams(**kwargs)`` with engine validation errors renamed to the API's field names.

    Example:
        >>> make_sampling_params({"max_new_tokens": "max_tokens"}, max_new_tokens=0)
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: max_tokens: must be an integer >= 1, got 0
    """
    try:
        return SamplingParams(**kwargs)
    except ValidationError as exc:
        raise bad_request(exc, names) from exc


def parse_logit_bias(logit_bias: Optional[dict[str, float]], vocab_size: int) -> Optional[dict[int, float]]:
    """OpenAI's ``{"token id as string": bias}`` as the engine's ``{int: float}``.

    Example:
        >>> parse_logit_bias({"42": -100}, 50000)
        {42: -100.0}
    """
    if not logit_bias:
        return None
    out = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias: keys must be token ids, got {key!r}", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise BadRequest(f"logit_bias: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                             param="logit_bias")
        if not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias: biases must be in [-100, 100], got {bias} for token {token_id}",
                             param="logit_bias")
        out[token_id] = float(bias)
    return out


def _first_lone_surrogate(value: Any, path: str) -> Optional[tuple[str, int, int]]:
    """(field path, character offset, code point) of the first lone surrogate in a string under ``value``
    (dictionary keys included), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # C speed; fails exactly on surrogates
        except UnicodeEncodeError as exc:
            return path, exc.start, ord(value[exc.start])
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # The path goes into the error message: a key that is itself the bad text is shown escaped.
            name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
            sub = f"{path}.{name}" if path else name
            found = _first_lone_surrogate(key, sub) or _first_lone_surrogate(item, sub)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}.{index}" if path else str(index))
            if found:
                return found
    return None


def reject_invalid_text(body: Any) -> None:
    """Raise :class:`BadRequest` naming the field when any text in a request body holds a lone UTF-16
    surrogate (``"\\ud800"`` is valid JSON but not Unicode text: no tokenizer, template or grammar can
    take it). OpenAI's, Anthropic's and DeepSeek's APIs reject such a body with a 400 too, rather than
    repairing it into text the client never sent.

    Example:
        >>> reject_invalid_text({"messages": [{"role": "user", "content": "ok \\ud800"}]})
        Traceback (most recent call last):
        ...
        tgi_nb.server.errors.BadRequest: messages.0.content: contains a lone UTF-16 surrogate (U+D800) at character 3; text must be valid Unicode
    """
    data = body.model_dump() if hasattr(body, "model_dump") else body
    found = _first_lone_surrogate(data, "")
    if found is not None:
        path, offset, code = found
        raise BadRequest(f"{path}: contains a lone UTF-16 surrogate (U+{code:04X}) at character {offset}; "
                         "text must be valid Unicode", param=path or None)


def stop_list(stop: Union[None, str, list[str]]) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]


