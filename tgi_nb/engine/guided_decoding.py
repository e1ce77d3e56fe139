"""Grammar-constrained decoding: JSON schemas, regular expressions and Lark grammars, with llguidance.

A grammar is compiled once per tokenizer (:class:`GrammarCompiler`, cached) into a :class:`Grammar`;
each sample of a request gets its own :class:`GrammarLogitsProcessor` (``Grammar.processor`` is the
``SamplingParams.logits_processor_factory``), whose matcher follows that sample's tokens and masks every
token that would leave the grammar. When the grammar is complete only the EOS tokens remain allowed, so
the sample ends there. llguidance computes a mask over a 50k vocabulary in tens of microseconds on CPU,
builds grammars lazily (no per-schema precompilation, unlike outlines) and is one of vLLM's and SGLang's
structured-output backends.

Example:
    >>> from transformers import AutoTokenizer                                            # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")         # doctest: +SKIP
    >>> compiler = GrammarCompiler.for_tokenizer(tok, vocab_size=49152, eos_token_ids=[2])  # doctest: +SKIP
    >>> grammar = compiler.compile(json_schema_grammar({"type": "object"}))                # doctest: +SKIP
    >>> grammar.matches('{"a": 1}'), grammar.matches('{"a": 1')                           # doctest: +SKIP
    (True, False)
    >>> params = SamplingParams(logits_processor_factory=grammar.processor)               # doctest: +SKIP
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import Any, Iterable, Union

import llguidance
import llguidance.hf
import torch

# How JSON is laid out: as json.dumps writes it (", " and ": ", no other whitespace). Models have
# seen this layout most; and with free whitespace a weak model can emit newlines forever inside a
# valid document. ``lenient``: keywords llguidance does not implement (a "format" it does not know)
# are ignored rather than rejected, as OpenAI-style clients send schemas written for other servers.
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                              "lenient": True}

# Bounds that make every JSON value end. A model at temperature 0 easily falls into a loop that a grammar
# keeps valid forever ("population": 1111111..., {"looks": {"looks": ...), so a constrained output must
# reach a point where only closing is left. Integers: at most 16 digits, as llama.cpp's JSON grammars
# allow (and about where a double stops being exact, 2**53 ~ 9.007e15); fractions: at most 10 digits;
# no exponent (llguidance writes bounded numbers without one). These only narrow what the model may
# write: every output still matches the client's schema. Strings are left unbounded: a long text is
# often what was asked for, and ``max_tokens`` bounds it.
MAX_INTEGER_DIGITS = 16
MAX_FRACTION_DIGITS = 10
_NUMBER_LIMIT = 10 ** MAX_INTEGER_DIGITS - 1
# ``json_object`` (any object, no schema): nesting and size bounds where a schema would give them.
# OpenAI's strict mode accepts schemas 10 levels deep; answers to "give me a JSON object" rarely need 5
# levels, 16 members or 32 items, and a loop (nesting {"looks": {"looks": ..., counting [1, 2, 3, ...)
# must hit a bound within a few dozen tokens to leave room for the closing brackets. A client that
# needs more describes it with a json_schema (maxItems, ...).
JSON_OBJECT_MAX_DEPTH = 5
JSON_OBJECT_MAX_PROPERTIES = 16
JSON_OBJECT_MAX_ITEMS = 32

_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A schema, regular expression or grammar that cannot be compiled; the message says why.

    Example:
        >>> str(GrammarError("Invalid type: foo"))
        'Invalid type: foo'
    """


# Where a JSON schema holds subschemas (2020-12 and draft-07 keywords): one, a list, or a map of names to them.
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
              "contains", "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def bounded_numbers(schema: Any) -> Any:
    """``schema`` with every ``integer`` and ``number`` that has no bound of its own given one: at most
    :data:`MAX_INTEGER_DIGITS` integer digits and :data:`MAX_FRACTION_DIGITS` fraction digits. Bounds the
    client set (``minimum``, ``exclusiveMaximum``, ``multipleOf``, ...) are kept. Anything that is not a
    schema is returned as it is, for llguidance to judge.

    Example:
        >>> bounded_numbers({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}})
        {'type': 'object', 'properties': {'n': {'type': 'integer', 'minimum': 0, 'maximum': 9999999999999999}}}
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: bounded_numbers(sub) for name, sub in value.items()}
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            out[key] = [bounded_numbers(sub) for sub in value]
        elif key in _SUBSCHEMA:
            out[key] = bounded_numbers(value)
    kind = schema.get("type")
    kinds = {k for k in (kind if isinstance(kind, list) else [kind]) if isinstance(k, str)}
    if kinds & {"integer", "number"}:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -_NUMBER_LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = _NUMBER_LIMIT
        if "number" in kinds and "multipleOf" not in out:
            out["multipleOf"] = float(f"1e-{MAX_FRACTION_DIGITS}")
    return out


def json_schema_grammar(schema: Union[dict[str, Any], bool]) -> str:
    """The grammar of JSON documents valid against ``schema`` (laid out as :data:`JSON_STYLE`, numbers
    bounded by :func:`bounded_numbers`).

    Example:
        >>> json.loads(json_schema_grammar({"type": "object"}))["grammars"][0]["json_schema"]["type"]
        'object'
    """
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object (or true), got {json.dumps(schema)[:100]}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(bounded_numbers(schema), defaults=JSON_STYLE)
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc


def with_json_style(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with :data:`JSON_STYLE` as its llguidance options and bounded numbers (see
    :func:`bounded_numbers`), for a ``%json{...}`` inside a Lark grammar (which does not take compile
    options from outside). The schema's own options win.

    Example:
        >>> with_json_style({"type": "object"})["x-guidance"]["item_separator"]
        ', '
    """
    return {**bounded_numbers(schema), "x-guidance": {**JSON_STYLE, **(schema.get("x-guidance") or {})}}


def json_object_grammar(max_depth: int = JSON_OBJECT_MAX_DEPTH, max_properties: int = JSON_OBJECT_MAX_PROPERTIES,
                        max_items: int = JSON_OBJECT_MAX_ITEMS) -> str:
    """The grammar of any JSON object nested at most ``max_depth`` levels, with at most ``max_properties``
    members per object and ``max_items`` per array, numbers bounded as in :func:`bounded_numbers`,
    laid out as :data:`JSON_STYLE` (OpenAI's ``response_format={"type": "json_object"}``).

    A JSON schema cannot say this (``{"type": "object"}`` allows any depth and llguidance has no
    ``maxProperties``), so the grammar is written in Lark, one rule per depth.

    Example:
        >>> print(json_object_grammar(max_depth=1, max_properties=2, max_items=2))  # doctest: +ELLIPSIS
        start: object_1
        object_1: "{" (member_1 (", " member_1){0,1})? "}"
        member_1: STRING ": " value_0
        value_0: STRING | NUMBER | "true" | "false" | "null"
        STRING: ...
    """
    if max_depth < 1 or max_properties < 1 or max_items < 1:
        raise GrammarError("json_object_grammar: max_depth, max_properties and max_items must be >= 1")
    rules = [f"start: object_{max_depth}"]
    for depth in range(max_depth, 0, -1):
        rules += [f'object_{depth}: "{{" (member_{depth} (", " member_{depth}){{0,{max_properties - 1}}})? "}}"',
                  f'member_{depth}: STRING ": " value_{depth - 1}']
        if depth > 1:
            below = depth - 1
            rules += [f'array_{below}: "[" (value_{below - 1} (", " value_{below - 1}){{0,{max_items - 1}}})? "]"',
                      f'value_{below}: object_{below} | array_{below} | STRING | NUMBER | "true" | "false" | "null"']
    rules += ['value_0: STRING | NUMBER | "true" | "false" | "null"',
              r'STRING: /"(?:[^"\\\x00-\x1f]|\\(?:["\\\/bfnrt]|u[0-9a-fA-F]{4}))*"/',
              f"NUMBER: /-?(?:0|[1-9][0-9]{{0,{MAX_INTEGER_DIGITS - 1}}})(?:\\.[0-9]{{1,{MAX_FRACTION_DIGITS}}})?/"]
    return lark_grammar("\n".join(rules))


def regex_grammar(pattern: str) -> str:
    """The grammar of strings that fully match the regular expression ``pattern`` (Rust regex syntax).

    ``\\d`` and ``\\w`` mean ASCII digits and word characters, as in JSON Schema and in the regex engines
    of outlines (TGI, vLLM): with Unicode classes a model may fill a phone number with Devanagari digits.

    Example:
        >>> regex_grammar(r"\\d{3}-\\w+")
        'start: /[0-9]{3}-[0-9a-zA-Z_]+/'
    """
    if not isinstance(pattern, str):
        raise GrammarError(f"a regular expression must be a string, got {json.dumps(pattern)[:100]}")
    return llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(pattern, 'dw')}/")


def lark_grammar(text: str) -> str:
    """A Lark grammar (llguidance's dialect, ``%json{...}`` included) or a llama.cpp GBNF grammar.

    Example:
        >>> lark_grammar('start: "yes" | "no"')
        'start: "yes" | "no"'
    """
    if not isinstance(text, str):
        raise GrammarError(f"a grammar must be a string, got {json.dumps(text)[:100]}")
    try:
        return llguidance.grammar_from("grammar", text)
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc


def choice_grammar(choices: Iterable[str]) -> str:
    """The grammar of exactly one of ``choices``.

    Example:
        >>> choice_grammar(["yes", "no"])
        'start: "yes" | "no"'
    """
    choices = list(choices)
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return llguidance.grammar_from("choice", json.dumps(choices))


class GrammarLogitsProcessor:
    """One sample's grammar state: advances with the sample's tokens, masks what the grammar forbids.

    Raises ``RuntimeError`` if the matcher fails (a token outside the grammar, a resource limit), which
    makes the engine fail this request only.
    """

    __slots__ = ("_matcher", "_consumed", "_bitmask")

    def __init__(self, matcher: Any, mask_size: int):
        self._matcher = matcher
        self._consumed = 0
        self._bitmask = torch.zeros((mask_size + 31) // 32, dtype=torch.int32)

    def fill_bitmask(self, generated: list[int], out: torch.Tensor) -> None:
        """Advance over the sample's new tokens and write the allowed next tokens into ``out``: one bit per token,
        32 to an int32 (a contiguous CPU int32 tensor covering the model's whole row: see GrammarCompiler). The
        GPU sampler masks a whole batch from these rows in one operation."""
        matcher = self._matcher
        if len(generated) > self._consumed:
            matcher.consume_tokens(generated[self._consumed:])
            self._consumed = len(generated)
        if out.dtype != torch.int32 or not out.is_contiguous() or out.numel() < self._bitmask.numel():
            raise ValueError(f"out must be a contiguous int32 tensor of >= {self._bitmask.numel()} elements")
        matcher.unsafe_compute_mask_ptr(out.data_ptr(), self._bitmask.numel() * 4)
        if matcher.is_error():
            raise RuntimeError(f"grammar: {matcher.get_error().splitlines()[0]}")

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        self.fill_bitmask(generated, self._bitmask)
        allowed = ((self._bitmask.unsqueeze(1) >> _SHIFTS) & 1).flatten().bool()
        return logits.masked_fill_(~allowed[:logits.shape[0]], float("-inf"))


class Grammar:
    """A grammar compiled for one tokenizer. :meth:`processor` builds one sample's logits processor.

    Example:
        >>> grammar = compiler.compile(regex_grammar("yes|no"))           # doctest: +SKIP
        >>> grammar.matches("yes"), grammar.matches("maybe")               # doctest: +SKIP
        (True, False)
    """

    __slots__ = ("_template", "_tokenizer", "_mask_size")

    def __init__(self, template: Any, tokenizer: Any, mask_size: int):
        self._template = template      # never advanced: every processor starts from a copy of it
        self._tokenizer = tokenizer
        self._mask_size = mask_size

    def processor(self) -> GrammarLogitsProcessor:
        """A fresh processor (use as ``SamplingParams(logits_processor_factory=grammar.processor)``)."""
        return GrammarLogitsProcessor(self._template.deep_copy(), self._mask_size)

    def matches(self, text: str) -> bool:
        """True when ``text`` is a complete sentence of the grammar."""
        matcher = self._template.deep_copy()
        return matcher.consume_tokens(self._tokenizer.tokenize_str(text)) and matcher.is_accepting()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, caching the most recent ones (clients resend a schema).

    ``vocab_size`` is the model's: its logits rows may be longer than the tokenizer's vocabulary, and
    the masks cover those padding ids too (never allowed). ``eos_token_ids`` are what the grammar allows
    once complete. Use :meth:`for_tokenizer`, which
    builds the (expensive, ~1 s) llguidance tokenizer once per tokenizer.

    Example:
        >>> compiler = GrammarCompiler.for_tokenizer(tok, vocab_size=49152, eos_token_ids=[2])  # doctest: +SKIP
        >>> compiler.compile(json_schema_grammar({"type": "integer"})).matches("42")          # doctest: +SKIP
        True
    """

    # Per tokenizer object, weakly: an engine unloaded and loaded again (scale to zero) leaves nothing behind.
    _instances: "weakref.WeakKeyDictionary[Any, dict[tuple, GrammarCompiler]]" = weakref.WeakKeyDictionary()
    _instances_lock = threading.Lock()
    CACHE_SIZE = 128
    # The cache's bound in grammar text (a compiled grammar grows with its text): a client sending large schemas
    # must not fill the memory; one larger than a quarter of it is compiled but not kept.
    CACHE_BYTES = 16 << 20

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]):
        self.vocab_size = max(vocab_size, len(tokenizer))
        eos = sorted(set(eos_token_ids)) or None
        try:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        except ValueError as exc:
            raise GrammarError(f"guided decoding needs a fast (Rust) tokenizer: {exc}") from exc
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> "GrammarCompiler":
        """The compiler for this tokenizer object, built on first use."""
        key = (vocab_size, tuple(sorted(set(eos_token_ids))))
        with cls._instances_lock:
            compilers = cls._instances.setdefault(tokenizer, {})
            if key not in compilers:
                compilers[key] = cls(tokenizer, vocab_size, key[1])
            return compilers[key]

    def compile(self, grammar: str) -> Grammar:
        """The :class:`Grammar` for a grammar string from :func:`json_schema_grammar` and friends;
        raises :class:`GrammarError` naming what is wrong with it."""
        with self._lock:
            cached = self._cache.get(grammar)
            if cached is not None:
                self._cache.move_to_end(grammar)
                return cached
        limits = llguidance.LLParserLimits(verbose_errors=False)
        template = llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0, limits=limits)
        if template.is_error():
            raise GrammarError(template.get_error())
        compiled = Grammar(template, self._ll_tokenizer, self.vocab_size)
        if len(grammar) > self.CACHE_BYTES // 4:
            return compiled
        with self._lock:
            if grammar not in self._cache:
                self._cache[grammar] = compiled
                self._cache_bytes += len(grammar)
            while len(self._cache) > self.CACHE_SIZE or self._cache_bytes > self.CACHE_BYTES:
                self._cache_bytes -= len(self._cache.popitem(last=False)[0])
        return compiled
