"""Structured output requests (OpenAI's ``response_format``, TGI's ``grammar``) as engine grammars.

Accepted shapes, on /v1/chat/completions as ``response_format`` and on /generate as ``parameters.grammar``:

- ``{"type": "text"}``: no constraint (``response_format`` only);
- ``{"type": "json_object"}``: any JSON object (bounded in depth and size so that it ends: see
  ``json_object_grammar``);
- ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`` (OpenAI), or with
  ``"value": {"name": ..., "schema": {...}}`` (TGI);
- ``{"type": "json", "value": {...schema...}}`` (TGI; the schema may also be a JSON string);
- ``{"type": "regex", "value": "..."}`` (TGI).

vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (Lark or GBNF) and
``structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}`` are accepted on
/v1/chat/completions and /v1/completions (:func:`request_guide`). One constraint per request.

Invalid shapes, schemas, regular expressions and grammars are 400s naming the field.

Example:
    >>> grammar_from_format({"type": "text"}, "response_format") is None
    True
    >>> grammar_from_format({"type": "xml"}, "response_format")
    Traceback (most recent call last):
    ...
    tgi_nb.server.errors.BadRequest: response_format.type: must be one of 'text', 'json_object', 'json_schema', 'json', 'regex', got 'xml'
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Optional

from starlette.concurrency import run_in_threadpool

from tgi_nb.engine.guided_decoding import (Grammar, GrammarCompiler, GrammarError, choice_grammar,
                                           json_object_grammar, json_schema_grammar, lark_grammar,
                                           regex_grammar)
from tgi_nb.engine.interface import GenerationEngine

from .errors import BadRequest

_TYPES = ("text", "json_object", "json_schema", "json", "regex")
# Seconds a grammar may take to compile (the first of a tokenizer takes about one on a 2-core machine).
GRAMMAR_COMPILE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class GuideSpec:
    """A grammar to compile and where it came from: ``param`` and ``what`` name it in a 400.
    ``parts`` are (param, grammar) pieces compiled one by one to find the culprit when the whole fails
    (the tool call grammar is one %json per tool)."""

    grammar: str
    param: str
    what: str
    parts: tuple[tuple[str, str], ...] = ()


def _schema_value(value: Any, param: str) -> Any:
    """A schema given as an object, or (as TGI allows) as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRequest(f"{param}: not valid JSON: {exc}", param=param) from None
    if not isinstance(value, (dict, bool)):
        raise BadRequest(f"{param}: must be a JSON schema (an object), got {json.dumps(value)[:100]}", param=param)
    return value


def _json_guide(schema: Any, param: str) -> GuideSpec:
    try:
        return GuideSpec(json_schema_grammar(schema), param, "JSON schema")
    except GrammarError as exc:
        raise BadRequest(f"{param}: invalid JSON schema: {exc}", param=param) from None


def grammar_from_format(spec: Optional[dict[str, Any]], param: str, *, allow_text: bool = True
                        ) -> Optional[GuideSpec]:
    """The grammar for a ``response_format`` / ``grammar`` object, or None when unconstrained.

    ``param`` names the field in errors (``response_format`` or ``grammar``). This checks the shape;
    errors inside a schema or regular expression surface in :func:`compile_guide`.

    Example:
        >>> grammar_from_format({"type": "json_schema", "json_schema": {
        ...     "name": "answer", "schema": {"type": "object"}}}, "response_format").param
        'response_format.json_schema.schema'
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadRequest(f"{param}: must be an object with a 'type', got {json.dumps(spec)[:100]}", param=param)
    kind = spec.get("type")
    allowed = _TYPES if allow_text else _TYPES[1:]
    if kind not in allowed:
        raise BadRequest(f"{param}.type: must be one of {', '.join(repr(t) for t in allowed)}, got {kind!r}",
                         param=f"{param}.type")
    if kind == "text":
        return None
    if kind in ("json_object", "json"):
        value = spec.get("value")
        if value is None:
            return GuideSpec(json_object_grammar(), param, "JSON object")
        return _json_guide(_schema_value(value, f"{param}.value"), f"{param}.value")
    if kind == "regex":
        value = spec.get("value")
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{param}.value: must be a regular expression (a non-empty string) for type "
                             f"'regex'", param=f"{param}.value")
        return GuideSpec(regex_grammar(value), f"{param}.value", "regular expression")
    # json_schema: OpenAI puts {name, schema, strict} under "json_schema", TGI under "value".
    key = "json_schema" if "json_schema" in spec else "value"
    config = spec.get(key)
    if not isinstance(config, dict):
        raise BadRequest(f"{param}.json_schema: must be an object {{\"name\", \"schema\", \"strict\"}} for type "
                         f"'json_schema', got {json.dumps(config)[:100]}", param=f"{param}.json_schema")
    # Without "schema" OpenAI's JSONSchema means any JSON; TGI's value may also be the bare schema.
    if "schema" in config:
        schema = _schema_value(config["schema"], f"{param}.{key}.schema")
    elif key == "value" and "name" not in config:
        schema = config
    else:
        schema = {}
    return _json_guide(schema, f"{param}.{key}.schema")


def _vllm_guide(kind: str, value: Any, param: str) -> GuideSpec:
    if kind == "json":
        return _json_guide(_schema_value(value, param), param)
    if kind == "json_object":
        if value is not True:
            raise BadRequest(f"{param}: must be true when set", param=param)
        return GuideSpec(json_object_grammar(), param, "JSON object")
    if kind == "choice":
        try:
            return GuideSpec(choice_grammar(value), param, "choice")
        except (GrammarError, TypeError):
            raise BadRequest(f"{param}: must be a non-empty list of non-empty strings", param=param) from None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{param}: must be a non-empty string", param=param)
    if kind == "regex":
        return GuideSpec(regex_grammar(value), param, "regular expression")
    try:
        return GuideSpec(lark_grammar(value), param, "grammar")
    except GrammarError as exc:
        raise BadRequest(f"{param}: invalid grammar: {exc}", param=param) from None


def request_guide(req: Any) -> Optional[GuideSpec]:
    """The one structured-output constraint a chat or completion request carries (``response_format``, a
    ``guided_*`` field or ``structured_outputs``), or None; two of them are a 400.

    Example:
        >>> from tgi_nb.server.protocol import CompletionRequest
        >>> request_guide(CompletionRequest(prompt="x", guided_choice=["yes", "no"])).param
        'guided_choice'
    """
    found: list[GuideSpec] = []
    response_format = grammar_from_format(getattr(req, "response_format", None), "response_format")
    if response_format is not None:
        found.append(response_format)
    structured = req.structured_outputs or {}
    if not isinstance(structured, dict):
        raise BadRequest("structured_outputs: must be an object", param="structured_outputs")
    for kind in ("json", "regex", "choice", "grammar", "json_object"):
        legacy = getattr(req, f"guided_{kind}", None)
        for param, value in ((f"guided_{kind}", legacy), (f"structured_outputs.{kind}", structured.get(kind))):
            if value is not None and value is not False:
                found.append(_vllm_guide(kind, value, param))
    if len(found) > 1:
        raise BadRequest(f"{found[1].param}: only one structured output constraint per request; "
                         f"{found[0].param} is set too", param=found[1].param)
    return found[0] if found else None


def compile_guide_sync(engine: GenerationEngine, spec: GuideSpec) -> Grammar:
    """:func:`compile_guide` on the calling thread."""
    try:
        compiler = GrammarCompiler.for_tokenizer(engine.tokenizer, engine.vocab_size, engine.eos_token_ids)
    except GrammarError as exc:
        raise BadRequest(f"{spec.param}: {exc}", param=spec.param) from None
    try:
        return compiler.compile(spec.grammar)
    except GrammarError as exc:
        param, error = spec.param, exc
        for part_param, part in spec.parts:
            try:
                compiler.compile(part)
            except GrammarError as part_exc:
                param, error = part_param, part_exc
                break
        raise BadRequest(f"{param}: invalid {spec.what}: {error}", param=param) from None


async def compile_guide(engine: GenerationEngine, spec: GuideSpec) -> Grammar:
    """Compile a grammar for ``engine``'s tokenizer off the event loop (the first grammar of a tokenizer
    takes about a second; later ones milliseconds, and repeated ones come from a cache).

    Bounded in time as well as by llguidance's fuel: a grammar still compiling after
    :data:`GRAMMAR_COMPILE_TIMEOUT` seconds is refused (400 naming the field); its thread finishes on its own.

    Example (inside a route):
        guide = await compile_guide(engine, grammar_from_format(req.response_format, "response_format"))
        params = SamplingParams(logits_processor_factory=guide.processor)
    """
    try:
        return await asyncio.wait_for(run_in_threadpool(compile_guide_sync, engine, spec), GRAMMAR_COMPILE_TIMEOUT)
    except asyncio.TimeoutError:
        raise BadRequest(f"{spec.param}: the {spec.what} could not be compiled within {GRAMMAR_COMPILE_TIMEOUT:g} s; "
                         f"simplify it", param=spec.param) from None
