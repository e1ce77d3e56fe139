"""Property-based tests (hypothesis) of invariants that are easy to state and hard to cover by examples:
incremental detokenization equals the full decode, stop strings never leak, the tool-call parser never raises.

Deterministic: ``derandomize=True`` draws the same examples every run (no flakes, no example database),
bounded example counts keep each test to seconds, and there is no deadline (a loaded machine is not a bug).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tgi_nb.engine.detokenizer import IncrementalDetokenizer
from tgi_nb.server.tool_parser import ToolCallParser, parse_tool_calls

PROPERTY = settings(derandomize=True, deadline=None, database=None, max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text whose tokens are the hard cases: characters of 2, 3 and 4 UTF-8 bytes split over several byte-level
# tokens, leading spaces, runs of whitespace and newlines.
TRICKY_TEXT = "é日本語😀🎉 naïve “quotes” — Ω\n\n\t  x ǅ 👩‍👩‍👧 ﷽ 𝔘"


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def token_ids(tokenizer) -> st.SearchStrategy[list[int]]:
    """Token sequences mixing the pieces of tricky text (multi-byte characters cut anywhere, in any order),
    special tokens (<|endoftext|>, <|im_start|>, <|im_end|>...) and any other id of the vocabulary."""
    tricky = sorted({t for ch in TRICKY_TEXT for t in tokenizer.encode(ch)} | set(tokenizer.encode(TRICKY_TEXT)))
    special = sorted(set(tokenizer.all_special_ids) | set(range(17)))
    token = st.one_of(st.sampled_from(tricky), st.sampled_from(special), st.integers(0, len(tokenizer) - 1))
    return st.lists(token, max_size=40)


def prompts(tokenizer) -> st.SearchStrategy[list[int]]:
    """Prompts as a client sends them: text (so they end on a character boundary), tokenized."""
    return st.text(alphabet=TRICKY_TEXT + "abc ", max_size=12).map(tokenizer.encode)


def run_like_the_engine(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], bool]:
    """Feed ``ids`` as ``LLMEngine._append`` does (add, check stops, flush at the last token, take what is
    safe); returns the pieces handed out and whether a stop string ended the sequence."""
    pieces = []
    for k, token_id in enumerate(ids):
        stop = detok.check_stop(len(detok.add_token(token_id)))
        last = k == len(ids) - 1
        if stop is None and last:
            stop = detok.check_stop(detok.flush())
        pieces.append(detok.take_output(final=stop is not None or last))
        if stop is not None:
            return pieces, True
    return pieces, False


def test_incremental_detokenization_equals_full_decode(tokenizer):
    @PROPERTY
    @given(prompt=prompts(tokenizer), ids=token_ids(tokenizer))
    def check(prompt, ids):
        detok = IncrementalDetokenizer(tokenizer, prompt)
        pieces = [detok.add_token(t) for t in ids]
        flushed = detok.flush()  # a last, incomplete character, decoded as is
        pieces.append(detok.text[len(detok.text) - flushed:])
        assert "".join(pieces) == detok.text
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=True)
        # Text waits for the rest of a character: no piece ends in half of one (a replacement character),
        # unless the tokens really are invalid UTF-8 there.
        clean = "\ufffd" not in tokenizer.decode(ids, skip_special_tokens=True)
        assert not clean or all("\ufffd" not in p for p in pieces)

    check()


def test_stop_strings_never_leak(tokenizer):
    @PROPERTY
    @given(data=st.data(), prompt=prompts(tokenizer), ids=token_ids(tokenizer))
    def check(data, prompt, ids):
        full = tokenizer.decode(ids, skip_special_tokens=True)
        # Stop strings cut from the text itself (so they do occur, across token boundaries) and random ones.
        cut = st.tuples(st.integers(0, max(0, len(full) - 1)), st.integers(1, 6)).map(lambda p: full[p[0]:sum(p)])
        stops = data.draw(st.lists(st.one_of(cut, st.text(alphabet=TRICKY_TEXT + "ab", min_size=1, max_size=4)),
                                   max_size=3).map(lambda s: [x for x in s if x]))
        detok = IncrementalDetokenizer(tokenizer, prompt, stops)
        pieces, stopped = run_like_the_engine(detok, ids)
        output = "".join(pieces)
        assert not any(s in output for s in stops), (output, stops)
        assert output == detok.text[:len(output)]  # nothing handed out is ever taken back
        if any(s in full for s in stops):
            assert stopped and full.startswith(output + detok.stopped_on), (output, detok.stopped_on, full)
        else:
            assert not stopped and output == full

    check()


# Pieces of Hermes tool calls, bare JSON calls and fences, so that arbitrary text often looks almost like a call.
_CALL_PIECES = ["<tool_call>", "</tool_call>", "<tool_c", "</tool", '{"name": "f", "arguments": {"x": 1}}',
                '{"name": "g", "parameters": "{}"}', '{"name": "f"', '"arguments":', "{", "}", "[", "]", '"', ",",
                "\\", "\\u00e9", "```json", "```", " ", "\n", "f", "null", "1e999", "é😀"]


@PROPERTY
@given(pieces=st.lists(st.one_of(st.sampled_from(_CALL_PIECES), st.text(max_size=8)), max_size=30),
       names=st.lists(st.sampled_from(["f", "g", "", "<tool_call>"]), max_size=3))
def test_tool_call_parser_never_raises(pieces, names):
    text = "".join(pieces)
    content, calls = parse_tool_calls(text, names)
    assert content is None or isinstance(content, str)
    # Streamed in the pieces given, the deltas add up to the calls the parser reports.
    parser = ToolCallParser(names)
    streamed_calls: dict[int, dict] = {}
    for piece in pieces:
        _, deltas = parser.feed(piece)
        for d in deltas:
            call = streamed_calls.setdefault(d["index"], {"name": None, "arguments": ""})
            call["name"] = call["name"] or d.get("function", {}).get("name")
            call["arguments"] += d["function"].get("arguments", "")
    for d in parser.finish()[1]:
        call = streamed_calls.setdefault(d["index"], {"name": None, "arguments": ""})
        call["name"] = call["name"] or d["function"].get("name")
        call["arguments"] += d["function"].get("arguments", "")
    assert [(c["name"], c["arguments"]) for c in streamed_calls.values()] == \
           [(c["function"]["name"], c["function"]["arguments"]) for c in parser.calls]
    for call in parser.calls:
        assert call["function"]["name"] in names
        json.dumps(call)  # what the server sends must serialize
