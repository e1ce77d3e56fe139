"""Token text and bytes for logprobs: the byte-level BPE table of a tokenizer (cached), cumulative logprobs."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Optional

from tgi_nb.engine.outputs import TokenLogprob
from tgi_nb.engine.interface import GenerationEngine

logger = logging.getLogger("tgi_nb.server")


# ----------------------------------------------------------------------------------------------
# Token text and bytes
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable stand-in character -> byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTable:
    """Per-token text, UTF-8 bytes and specialness, cached (logprobs need them for every token).

    Bytes are exact for byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM): a token that is half
    of a multi-byte character gets its real bytes, not the replacement character's.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        self._byte_level = any(t.startswith("Ġ") for t in list(vocab)[:5000])
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def bytes(self, token_id: int) -> list[int]:
        data = self._bytes.get(token_id)
        if data is None:
            data = None
            if self._byte_level and token_id not in self.special_ids:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                decoder = _byte_decoder()
                if isinstance(piece, str) and all(c in decoder for c in piece):
                    data = [decoder[c] for c in piece]
            if data is None:
                data = list(self.text(token_id).encode("utf-8"))
            self._bytes[token_id] = data
        return data

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids


@lru_cache(maxsize=2)
def _token_table_for(tokenizer: Any) -> TokenTable:
    return TokenTable(tokenizer)


def token_table(engine: GenerationEngine) -> TokenTable:
    """The (cached) :class:`TokenTable` of ``engine.tokenizer``; only the last two tokenizers are kept."""
    return _token_table_for(engine.tokenizer)


def cumulative_logprob(logprobs: Optional[list[TokenLogprob]]) -> float:
    """The sum of a sample's token log-probabilities (0 when it has none), to rank best_of candidates."""
    return sum(lp.logprob for lp in logprobs or [])


