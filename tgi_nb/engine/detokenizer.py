"""Incremental detokenization and stop-string matching for one sequence.

Decoding tokens one by one is wrong for byte-level BPE (a multi-byte UTF-8 character spans tokens)
and for SentencePiece (a leading-space token decodes without its space at the start of a string).
So each step decodes a short window that starts a few tokens back (``prefix_offset``) and emits what
the window adds beyond the already-emitted part (``read_offset``), waiting while the text ends in an
incomplete character. Stop strings are matched on the accumulated text, across token boundaries;
text that could still turn into a stop string is held back, so a stop string never leaks out.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

from .outputs import TokenLogprob, TopLogprob

REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt kept as left context so the first generated token decodes as it would mid-text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas.

    Example:
        >>> from transformers import AutoTokenizer                     # doctest: +SKIP
        >>> tok = AutoTokenizer.from_pretrained("path/to/model")        # doctest: +SKIP
        >>> d = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Hi"), stop=["\\n"])  # doctest: +SKIP
        >>> d.add_token(tok.encode(" there")[0])                       # doctest: +SKIP
        ' there'
    """

    __slots__ = ("_decode", "_ids", "_prefix_offset", "_read_offset", "text", "_emitted", "stop",
                 "_max_stop", "stopped_on", "_matched", "_scanned")

    def __init__(self, tokenizer, prompt_ids: list[int], stop: Optional[list[str]] = None):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer's decode skips transformers' Python wrapper: ~10x less overhead per call.
        if backend is not None:
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        context = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""          # all text generated so far (cut at a stop string once matched)
        self._emitted = 0       # how much of ``text`` has been handed out
        self.stop = list(stop or [])
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.stopped_on: Optional[str] = None
        # Per stop string: the longest prefix of it that ends ``text[:_scanned]`` (see _stop_prefix_overlap).
        self._matched = [0] * len(self.stop)
        self._scanned = 0

    def add_token(self, token_id: int) -> str:
        """Add a generated token; return the new text it completes (may be empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def check_stop(self, delta_len: int) -> Optional[str]:
        """After ``delta_len`` characters were appended, look for a stop string that ends in them.
        On a match the text is cut before it and the stop string is returned."""
        if not self.stop or not delta_len:
            return None
        start = max(0, len(self.text) - delta_len - self._max_stop + 1)
        best = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        self.text = self.text[:best[0]]
        self.stopped_on = best[1]
        return best[1]

    def take_output(self, final: bool) -> str:
        """Text that is safe to hand out now. Unless ``final``, a tail that is the beginning of a
        stop string is held back until it is known not to be one."""
        end = len(self.text)
        if not final and self.stop:
            end -= self._stop_prefix_overlap()
        end = max(end, self._emitted)
        out = self.text[self._emitted:end]
        self._emitted = end
        return out

    def _stop_prefix_overlap(self) -> int:
        """How many characters at the end of ``text`` could begin a stop string. Knuth-Morris-Pratt over the
        characters added since the last call: linear in the text, where testing each prefix length with a
        slice was quadratic in the stop's length at every token."""
        text = self.text
        if self._scanned > len(text):  # cut at a stop string: only the last characters can still matter
            self._scanned = max(0, len(text) - self._max_stop)
            self._matched = [0] * len(self.stop)
        longest = 0
        for i, s in enumerate(self.stop):
            fail = _failure(s)
            matched = _advance(s, fail, self._matched[i], text, self._scanned)
            self._matched[i] = matched
            longest = max(longest, matched if matched < len(s) else fail[-1])
        self._scanned = len(text)
        return longest

    def flush(self) -> int:
        """At the end of a sequence, add text withheld while waiting for the rest of a multi-byte
        character (decoded as is, with replacement characters). Returns how much text it added."""
        if self._read_offset >= len(self._ids):
            return 0
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        delta = self._decode(self._ids[self._prefix_offset:])[len(prefix_text):]
        self._read_offset = len(self._ids)
        self.text += delta
        return len(delta)


class TokenTexts:
    """Each token's own text, decoded once: what log-probability entries show.

    Example:
        >>> class Tok:
        ...     def decode(self, ids): return "<%d>" % ids[0]
        >>> entry = TokenTexts(Tok()).logprob(7, -0.5, [(7, -0.5), (3, -1.5)])
        >>> entry.token, [t.token for t in entry.top]
        ('<7>', ['<7>', '<3>'])
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text

    def logprob(self, token_id: int, logprob: float, top: Iterable[tuple[int, float]]) -> TokenLogprob:
        """A token's log-probability entry; ``top`` gives (token id, log-probability) alternatives."""
        return TokenLogprob(token_id, self(token_id), logprob, [TopLogprob(t, self(t), lp) for t, lp in top])


@functools.lru_cache(maxsize=1024)
def _failure(stop: str) -> tuple[int, ...]:
    """Knuth-Morris-Pratt's table of ``stop``: entry i is the length of the longest proper prefix of
    ``stop[:i + 1]`` that is also its suffix.

    Example:
        >>> _failure("abab"), _failure("aaa")
        ((0, 0, 1, 2), (0, 1, 2))
    """
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


def _advance(stop: str, fail: tuple[int, ...], matched: int, text: str, start: int) -> int:
    """The longest prefix of ``stop`` that ends ``text``, given ``matched`` for ``text[:start]``.

    Example:
        >>> _advance("STOP", _failure("STOP"), 0, "and ST", 0), _advance("STOP", _failure("STOP"), 2, "and STO", 6)
        (2, 3)
    """
    for i in range(start, len(text)):
        ch = text[i]
        while matched and (matched == len(stop) or stop[matched] != ch):
            matched = fail[matched - 1]
        if stop[matched] == ch:
            matched += 1
    return matched
