"""The report of a replay: per request and target (:class:`Outcome`), per target (:meth:`Report.summary`), as
markdown, CSV and a plot.

The reference of a request is the answer recorded with it (OpenAI's, when it was recorded against OpenAI), or,
for a workload recorded without answers, the first target's answer. ``similarity`` is the cosine similarity of
the answer's and the reference's embeddings (an endpoint's /v1/embeddings); ``exact_match`` is reported where
the request was deterministic (temperature 0).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .checks import answer_text, deterministic
from .workload import Workload

# Characters of an answer that its embedding sees (small embedding models read ~256 tokens).
SIMILARITY_CHARS = 1000


@dataclass
class Outcome:
    """One request on one target: what was sent and got, and what the checks found."""

    custom_id: str
    target: str
    endpoint: str
    status: Optional[int]
    error: Optional[str] = None
    refused: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    text: Optional[str] = None
    json_valid: Optional[bool] = None
    schema_valid: Optional[bool] = None
    tool_calls_valid: Optional[bool] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    latency: Optional[float] = None
    similarity: Optional[float] = None
    exact_match: Optional[bool] = None
    request: dict[str, Any] = field(default_factory=dict, repr=False)
    response: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def _percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _rate(values: list[Optional[bool]]) -> str:
    known = [v for v in values if v is not None]
    return f"{sum(known)}/{len(known)}" if known else ""


def _counts(counter: Counter) -> str:
    return ", ".join(f"{k} x{n}" for k, n in counter.most_common())


def _short(text: Optional[str], width: int = 80) -> str:
    text = (text or "").replace("\n", " ").replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


class Report:
    """What changed between the reference answers and each target's.

    Example:
        >>> w = Workload.of([{"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}])
        >>> r = Report(w, ["a"], [Outcome("request-1", "a", "/v1/chat/completions", 200, text="Hello",
        ...                               finish_reason="stop", latency=0.5, request=w[0].body)])
        >>> r.summary()[0]["finish_reasons"], r.reference_label
        ('stop x1', 'the first target (a)')
    """

    def __init__(self, workload: Workload, targets: list[str], outcomes: list[Outcome]):
        self.workload = workload
        self.targets = targets
        self.outcomes = outcomes
        recorded = any(item.reference is not None for item in workload)
        self.reference_label = "the recorded answers" if recorded else f"the first target ({targets[0]})"
        self._references = self._reference_texts(recorded)
        for o in outcomes:
            reference = self._references.get(o.custom_id)
            if reference is not None and o.text is not None and deterministic(o.request) and not self._is_reference(o):
                o.exact_match = o.text == reference

    def _reference_texts(self, recorded: bool) -> dict[str, Optional[str]]:
        if recorded:
            return {item.custom_id: answer_text(item.url, item.reference) for item in self.workload
                    if item.reference is not None}
        return {o.custom_id: o.text for o in self.outcomes if o.target == self.targets[0] and o.ok}

    def _is_reference(self, outcome: Outcome) -> bool:
        return not self.reference_label.startswith("the recorded") and outcome.target == self.targets[0]

    def reference(self, custom_id: str) -> Optional[str]:
        """The reference answer's text for a request."""
        return self._references.get(custom_id)

    def request(self, custom_id: str) -> dict[str, Outcome]:
        """Every target's outcome for one request, by target label (to compare them side by side)."""
        return {o.target: o for o in self.outcomes if o.custom_id == custom_id}

    # -- similarity ----------------------------------------------------------------------------
    def add_similarity(self, client: Any, model: str = "text-embedding-3-small") -> None:
        """Fill ``similarity`` using ``client.embeddings`` (an ``openai.OpenAI``; tgi_nb's and other open
        servers embed with their own model whatever ``model`` says)."""
        pairs = [(o, self._references.get(o.custom_id)) for o in self.outcomes
                 if o.text and self._references.get(o.custom_id) and not self._is_reference(o)]
        texts = sorted({t[:SIMILARITY_CHARS] for o, ref in pairs for t in (o.text, ref)})
        vectors: dict[str, list[float]] = {}
        for start in range(0, len(texts), 64):
            chunk = texts[start:start + 64]
            result = client.embeddings.create(model=model, input=chunk, encoding_format="float")
            vectors.update(zip(chunk, (d.embedding for d in sorted(result.data, key=lambda d: d.index))))
        for o, ref in pairs:
            o.similarity = round(_cosine(vectors[o.text[:SIMILARITY_CHARS]], vectors[ref[:SIMILARITY_CHARS]]), 4)

    # -- totals --------------------------------------------------------------------------------
    def summary(self) -> list[dict[str, Any]]:
        """One row per target: requests, errors, refused and ignored parameters, finish reasons, JSON / schema /
        tool-call validity, tokens, latency (p50, p95), mean similarity and exact matches."""
        rows = []
        for target in self.targets:
            mine = [o for o in self.outcomes if o.target == target]
            ok = [o for o in mine if o.ok]
            latencies = [o.latency for o in ok if o.latency is not None]
            similarity = [o.similarity for o in mine if o.similarity is not None]
            completion = [o.completion_tokens for o in ok if o.completion_tokens is not None]
            rows.append({
                "target": target, "requests": len(mine), "errors": len(mine) - len(ok),
                "refused": _counts(Counter(p for o in mine for p in o.refused)),
                "ignored": _counts(Counter(p for o in mine for p in o.ignored)),
                "finish_reasons": _counts(Counter(o.finish_reason for o in ok if o.finish_reason)),
                "json_valid": _rate([o.json_valid for o in ok]), "schema_valid": _rate([o.schema_valid for o in ok]),
                "tool_calls_valid": _rate([o.tool_calls_valid for o in ok]),
                "prompt_tokens": sum(o.prompt_tokens or 0 for o in ok),
                "completion_tokens_mean": round(sum(completion) / len(completion), 1) if completion else None,
                "latency_p50_s": _round(_percentile(latencies, 0.5)), "latency_p95_s": _round(_percentile(latencies, 0.95)),
                "similarity_mean": round(sum(similarity) / len(similarity), 3) if similarity else None,
                "exact_match": _rate([o.exact_match for o in mine]),
            })
        return rows

    # -- export --------------------------------------------------------------------------------
    def to_markdown(self, max_rows: int = 50) -> str:
        """The summary table, then up to ``max_rows`` requests (one row per request and target)."""
        summary = self.summary()
        columns = list(summary[0])
        lines = [f"**Replay of {len(self.workload)} requests on {len(self.targets)} target(s)**; reference: "
                 f"{self.reference_label}.", "", "| " + " | ".join(columns) + " |",
                 "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("" if row[c] is None else _short(str(row[c]), 60) for c in columns) + " |"
                  for row in summary]
        lines += ["", "| request | target | status | finish | tokens | latency (s) | similarity | exact | notes | "
                      "answer |", "|---|---|---|---|---|---|---|---|---|---|"]
        for o in self.outcomes[:max_rows]:
            notes = "; ".join(filter(None, [o.error and _short(o.error, 60),
                                            o.refused and "refused " + ", ".join(o.refused),
                                            o.ignored and "ignored " + ", ".join(o.ignored)]))
            lines.append(f"| {o.custom_id} | {o.target} | {o.status or ''} | {o.finish_reason or ''} | "
                         f"{o.completion_tokens if o.completion_tokens is not None else ''} | "
                         f"{_round(o.latency) or ''} | {'' if o.similarity is None else o.similarity} | "
                         f"{'' if o.exact_match is None else ('yes' if o.exact_match else 'no')} | {notes} | "
                         f"{_short(o.text)} |")
        if len(self.outcomes) > max_rows:
            lines.append(f"\n({len(self.outcomes) - max_rows} more rows in to_csv())")
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        return self.to_markdown(max_rows=20)

    def to_csv(self, path: Union[None, str, Path] = None) -> str:
        """One row per request and target (with the answer and the reference); written to ``path`` if given."""
        out = io.StringIO()
        names = [n for n in Outcome.__dataclass_fields__ if n not in ("request", "response")]
        writer = csv.DictWriter(out, fieldnames=names + ["reference"])
        writer.writeheader()
        for o in self.outcomes:
            row = {k: v for k, v in asdict(o).items() if k in names}
            row["refused"], row["ignored"] = ";".join(o.refused), ";".join(o.ignored)
            writer.writerow({**row, "reference": self._references.get(o.custom_id)})
        if path is not None:
            Path(path).write_text(out.getvalue())
        return out.getvalue()

    def to_json(self) -> str:
        """Every outcome with its request and response, as JSON (for tools that read the report back)."""
        return json.dumps({"reference": self.reference_label, "targets": self.targets,
                           "outcomes": [asdict(o) for o in self.outcomes]})

    def plot(self) -> Any:
        """A matplotlib figure: latency and similarity per target, and the finish reasons."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        by_target = {t: [o for o in self.outcomes if o.target == t] for t in self.targets}
        labels = [t if len(t) <= 24 else t[:23] + "…" for t in self.targets]
        axes[0].boxplot([[o.latency for o in os if o.ok and o.latency is not None] or [0] for os in by_target.values()],
                        tick_labels=labels, orientation="horizontal")
        axes[0].set_xlabel("latency (s)")
        axes[1].boxplot([[o.similarity for o in os if o.similarity is not None] or [math.nan]
                         for os in by_target.values()], tick_labels=labels, orientation="horizontal")
        axes[1].set_xlabel(f"similarity to {self.reference_label}")
        axes[1].set_yticklabels([])
        reasons = sorted({o.finish_reason or "error" for o in self.outcomes})
        left = [0] * len(self.targets)
        for reason in reasons:
            counts = [sum(1 for o in os if (o.finish_reason or "error") == reason) for os in by_target.values()]
            axes[2].barh(labels, counts, left=left, label=reason)
            left = [a + b for a, b in zip(left, counts)]
        axes[2].set_xlabel("requests by finish_reason")
        axes[2].legend(fontsize="small")
        axes[2].set_yticklabels([])
        fig.tight_layout()
        return fig


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 3)
