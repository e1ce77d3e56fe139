"""What the engine hands back: streamed deltas per step and finished results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional



# RequestOutput.error starts with this when a step failed for lack of memory (the server answers 503).
OUT_OF_MEMORY = "out of memory"

@dataclass(slots=True)
class TopLogprob:
    """One alternative at a position: token id, its text and log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    """The chosen token at one position, its log-probability and the top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass(slots=True)
class CompletionDelta:
    """What one sample (``index`` of ``n``) produced in one engine step.

    ``text`` is new text only, never a stop string or a prefix of one that may still match;
    ``finish_reason`` is set on the sample's last delta, with ``stop_reason`` the matched stop
    string or stop token id (None for EOS and length).
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None  # "stop" (EOS, stop token or string), "length", "abort" or "error"
    stop_reason: Optional[str | int] = None


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one request: a delta per sample that advanced.

    ``finished`` is True on the request's last output (every sample finished). ``error`` carries
    the message when the engine failed the request (then each unfinished sample ends with
    finish_reason "error"). ``queue_time`` (seconds from arrival to first being scheduled) is set on
    a request's first output, and so is ``prompt_logprobs`` when the request asked for them (position i
    scores prompt token i; position 0 is None).
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionDelta]
    finished: bool = False
    num_cached_tokens: int = 0
    error: Optional[str] = None
    queue_time: Optional[float] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None


@dataclass(slots=True)
class CompletionResult:
    """A finished sample: its whole text, tokens and (if asked) log-probabilities."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: Optional[str | int] = None
    logprobs: Optional[list[TokenLogprob]] = None


@dataclass(slots=True)
class GenerationResult:
    """A finished request: every sample, plus the token counts OpenAI calls usage."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionResult]
    num_cached_tokens: int = 0
    error: Optional[str] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class ResultAccumulator:
    """Folds a request's stream of ``RequestOutput`` into a ``GenerationResult``.

    Example:
        >>> acc = ResultAccumulator("r1", n=1)
        >>> acc.add(RequestOutput("r1", [1, 2], [CompletionDelta(0, "Hi", [5], finish_reason="stop")], True))
        >>> acc.result().outputs[0].text
        'Hi'
    """

    def __init__(self, request_id: str, n: int):
        self.request_id = request_id
        self.prompt_token_ids: list[int] = []
        self.num_cached_tokens = 0
        self.error: Optional[str] = None
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
        self._texts = [[] for _ in range(n)]
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._logprobs: list[Optional[list[TokenLogprob]]] = [None] * n
        self._finish: list[Optional[str]] = [None] * n
        self._stop_reason: list[Optional[str | int]] = [None] * n

    def add(self, out: RequestOutput) -> None:
        self.prompt_token_ids = out.prompt_token_ids
        self.num_cached_tokens = out.num_cached_tokens
        self.error = out.error or self.error
        self.prompt_logprobs = out.prompt_logprobs or self.prompt_logprobs
        for d in out.outputs:
            self._texts[d.index].append(d.text)
            self._tokens[d.index].extend(d.token_ids)
            if d.logprobs is not None:
                self._logprobs[d.index] = (self._logprobs[d.index] or []) + d.logprobs
            if d.finish_reason is not None:
                self._finish[d.index] = d.finish_reason
                self._stop_reason[d.index] = d.stop_reason

    def result(self) -> GenerationResult:
        outputs = [
            CompletionResult(i, "".join(self._texts[i]), self._tokens[i], self._finish[i] or "abort",
                             self._stop_reason[i], self._logprobs[i])
            for i in range(len(self._texts))
        ]
        return GenerationResult(self.request_id, self.prompt_token_ids, outputs,
                                self.num_cached_tokens, self.error, self.prompt_logprobs)
