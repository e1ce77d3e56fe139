"""Citations a small model leaves out, and answers the documents do not hold.

The prompt asks for ``[n]`` markers, but a 135M model seldom writes them. :func:`cite` adds them where the
answer left them out: each sentence without a marker gets the number of the passage it shares the most content
words with, if it shares enough (a sentence the passages do not support stays unmarked). :func:`relevant`
says whether the best passage was close enough to the question for the answer to come from the documents
(cosine similarity of all-MiniLM-L6-v2 embeddings: about 0.5-0.8 for a question a passage answers, under 0.15
for an unrelated one).
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

#: Below this best score the documents probably do not hold the answer: the widget and ``Answer.found`` say so.
MIN_RELEVANCE = 0.3
#: A sentence is credited to a passage when at least this share of its content words (and two words) are in it.
MIN_OVERLAP = 0.4

_WORD = re.compile(r"[^\W_]+(?:[.,'][^\W_]+)*", re.UNICODE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_MARKER = re.compile(r"\[\d+\]")
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were which with "
    "what when where who how why did does do not no yes you your i we they he she them their there these those "
    "can could would should will may might about into than then so if but also".split())


class Passage(Protocol):
    number: int
    chunk: str
    score: float


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in _STOPWORDS and len(w) > 1}


def cite(text: str, sources: Sequence[Passage]) -> str:
    """``text`` with a ``[n]`` marker after each sentence that has none and is supported by passage ``n``.

    Example:
        >>> from tgi_nb.rag.pipeline import Source
        >>> sources = [Source(1, "a.md", "The Eiffel Tower was finished in 1889.", 0.8),
        ...            Source(2, "b.md", "Mount Fuji is 3,776 metres high.", 0.1)]
        >>> cite("It was finished in 1889. I hope this helps!", sources)
        'It was finished in 1889 [1]. I hope this helps!'
        >>> cite("Fuji is 3,776 metres high [2].", sources)      # the model's own markers stay
        'Fuji is 3,776 metres high [2].'
    """
    passages = [(s.number, _words(s.chunk)) for s in sources]
    out = []
    for sentence in _SENTENCE.split(text):
        words = _words(sentence)
        if _MARKER.search(sentence) or len(words) < 2 or not passages:
            out.append(sentence)
            continue
        number, shared = max(((n, len(words & p)) for n, p in passages), key=lambda item: item[1])
        if shared >= 2 and shared / len(words) >= MIN_OVERLAP:
            stripped = sentence.rstrip()
            end = len(stripped.rstrip(".!?"))
            sentence = f"{stripped[:end]} [{number}]{stripped[end:]}{sentence[len(stripped):]}"
        out.append(sentence)
    return " ".join(out)


def relevant(sources: Sequence[Passage]) -> bool:
    """True when the best passage scores at least :data:`MIN_RELEVANCE`.

    Example:
        >>> from tgi_nb.rag.pipeline import Source
        >>> relevant([Source(1, "a.md", "Paris is in France.", 0.12)])
        False
    """
    return any(s.score >= MIN_RELEVANCE for s in sources)


def not_found_warning(sources: Sequence[Passage]) -> str:
    """The sentence shown with an answer whose passages scored low ("" when they did not).

    Example:
        >>> from tgi_nb.rag.pipeline import Source
        >>> not_found_warning([Source(1, "a.md", "Paris is in France.", 0.12)])[:32]
        'Not found in your documents: the'
    """
    if relevant(sources):
        return ""
    best = max((s.score for s in sources), default=0.0)
    return (f"Not found in your documents: the closest passage scores {best:.2f} (below {MIN_RELEVANCE:.2f}), "
            "so this answer does not come from them and may be invented.")
