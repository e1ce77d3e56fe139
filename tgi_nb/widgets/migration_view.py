"""HTML and SVG for ``MigrationWidget``: a migration report's tables, its charts, and one request side by side.

Pure functions of a :class:`~tgi_nb.migrate.Report` (or its outcomes so far), so the widget only swaps strings
into its ``HTML`` children from its background thread.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from typing import Any, Optional

from tgi_nb.migrate import Outcome, Report, WorkItem

_COLOURS = ("#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#6b7280")
_SUMMARY_COLUMNS = (("target", "target"), ("requests", "requests"), ("errors", "errors"), ("refused", "refused"),
                    ("ignored", "ignored"), ("finish_reasons", "finish reasons"), ("json_valid", "JSON"),
                    ("schema_valid", "schema"), ("tool_calls_valid", "tool calls"),
                    ("completion_tokens_mean", "tokens (mean)"), ("latency_p50_s", "latency p50 (s)"),
                    ("latency_p95_s", "p95 (s)"), ("similarity_mean", "similarity"), ("exact_match", "exact"))


def _cell(value: Any) -> str:
    return "–" if value in (None, "") else html.escape(str(value))


def summary_table(report: Report) -> str:
    """The per-target summary as an HTML table.

    Example:
        >>> from tgi_nb.migrate import Workload
        >>> r = Report(Workload.of([{"prompt": "x"}]), ["a"], [Outcome("request-1", "a", "/v1/completions", 200)])
        >>> "<td>a</td>" in summary_table(r)
        True
    """
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in _SUMMARY_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(row[key])}</td>" for key, _ in _SUMMARY_COLUMNS) + "</tr>"
                   for row in report.summary())
    return (f"<div style='font-size:12px'>Reference: {html.escape(report.reference_label)}</div>"
            f"<table class='tgi-migration-summary' style='font-size:12px'><tr>{head}</tr>{rows}</table>")


def outcome_rows(outcomes: list[Outcome], limit: int = 200) -> str:
    """One row per request and target (the newest ``limit``), with what the checks found."""
    def flag(value: Optional[bool]) -> str:
        return "" if value is None else ("✓" if value else "✗")

    rows = []
    for o in outcomes[-limit:]:
        notes = "; ".join(filter(None, [o.error, o.refused and "refused " + ", ".join(o.refused),
                                        o.ignored and "ignored " + ", ".join(o.ignored)]))
        checks = " ".join(f"{name}{flag(v)}" for name, v in (("json", o.json_valid), ("schema", o.schema_valid),
                                                              ("tools", o.tool_calls_valid)) if v is not None)
        rows.append(f"<tr><td>{html.escape(o.custom_id)}</td><td>{html.escape(o.target)}</td>"
                    f"<td>{_cell(o.status)}</td><td>{_cell(o.finish_reason)}</td><td>{_cell(o.completion_tokens)}</td>"
                    f"<td>{_cell(None if o.latency is None else f'{o.latency:.2f}')}</td>"
                    f"<td>{_cell(o.similarity)}</td><td>{flag(o.exact_match)}</td><td>{html.escape(checks)}</td>"
                    f"<td>{html.escape(notes[:120])}</td><td>{html.escape((o.text or '')[:160])}</td></tr>")
    return ("<table class='tgi-migration-table' style='font-size:12px'><tr><th>request</th><th>target</th>"
            "<th>status</th><th>finish</th><th>tokens</th><th>latency (s)</th><th>similarity</th><th>exact</th>"
            f"<th>checks</th><th>notes</th><th>answer</th></tr>{''.join(rows)}</table>")


def bar_chart(values: dict[str, Optional[float]], title: str, unit: str = "", width: int = 300,
              top: Optional[float] = None) -> str:
    """Horizontal SVG bars, one per target, scaled to ``top`` (default: the largest value); a value at or below
    zero has no bar, only its number.

    Example:
        >>> "<rect" in bar_chart({"a": 1.0, "b": None}, "latency p50", " s")
        True
    """
    known = [v for v in values.values() if v is not None]
    top = top or (max(known) if known and max(known) > 0 else 1.0)
    row, label_w = 18, 110
    height = row * len(values) + 20
    parts = [f"<svg width='{width}' height='{height}' style='background:var(--jp-layout-color2,#f9fafb)'>"]
    for i, (label, value) in enumerate(values.items()):
        y = 16 + i * row
        parts.append(f"<text x='2' y='{y + 10}' font-size='10'>{html.escape(label[:18])}</text>")
        if value is not None:
            bar = (width - label_w - 50) * max(value, 0.0) / top
            parts.append(f"<rect x='{label_w}' y='{y}' width='{bar:.1f}' height='12' fill='{_COLOURS[0]}'/>"
                         f"<text x='{label_w + bar + 4:.1f}' y='{y + 10}' font-size='10'>{value:.3g}{unit}</text>")
    parts.append("</svg>")
    return (f"<div class='tgi-migration-plot' style='display:inline-block;margin:4px'>"
            f"<div style='font-size:12px'>{html.escape(title)}</div>{''.join(parts)}</div>")


def stacked_chart(counts: dict[str, Counter], title: str, width: int = 300) -> str:
    """Horizontal stacked SVG bars (finish reasons per target) with a legend."""
    keys = sorted({k for c in counts.values() for k in c})
    colour = {k: _COLOURS[i % len(_COLOURS)] for i, k in enumerate(keys)}
    top = max((sum(c.values()) for c in counts.values()), default=0) or 1
    row, label_w = 18, 110
    parts = [f"<svg width='{width}' height='{row * len(counts) + 34}' "
             "style='background:var(--jp-layout-color2,#f9fafb)'>"]
    for i, (label, counter) in enumerate(counts.items()):
        y, x = 16 + i * row, float(label_w)
        parts.append(f"<text x='2' y='{y + 10}' font-size='10'>{html.escape(label[:18])}</text>")
        for key in keys:
            span = (width - label_w - 10) * counter.get(key, 0) / top
            parts.append(f"<rect x='{x:.1f}' y='{y}' width='{span:.1f}' height='12' fill='{colour[key]}'/>")
            x += span
    legend_y = 16 + len(counts) * row + 10
    parts += [f"<text x='{2 + 70 * i}' y='{legend_y}' font-size='10' fill='{colour[k]}'>■ {html.escape(k)}</text>"
              for i, k in enumerate(keys)]
    parts.append("</svg>")
    return (f"<div class='tgi-migration-plot' style='display:inline-block;margin:4px'>"
            f"<div style='font-size:12px'>{html.escape(title)}</div>{''.join(parts)}</div>")


def charts(report: Report) -> str:
    """Latency p50, similarity to the reference and finish reasons, per target."""
    summary = {row["target"]: row for row in report.summary()}
    finish = {t: Counter(o.finish_reason or ("error" if not o.ok else "–") for o in report.outcomes if o.target == t)
              for t in report.targets}
    return (bar_chart({t: summary[t]["latency_p50_s"] for t in report.targets}, "latency p50", " s")
            + bar_chart({t: summary[t]["similarity_mean"] for t in report.targets},
                        f"similarity to {report.reference_label}", top=1.0)
            + stacked_chart(finish, "finish reasons"))


def _request_text(item: WorkItem) -> str:
    body = item.body
    if isinstance(body.get("messages"), list):
        return "\n".join(f"{m.get('role')}: {m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'))}"
                         for m in body["messages"] if isinstance(m, dict))
    return str(body.get("prompt", body.get("input", "")))


def side_by_side(report: Report, custom_id: str) -> str:
    """One request: what was asked, the reference answer, and each target's answer with its figures."""
    item = next((i for i in report.workload if i.custom_id == custom_id), None)
    if item is None:
        return ""
    settings = {k: v for k, v in item.body.items() if k not in ("messages", "prompt", "input", "tools")}
    columns = [("reference", report.reference(custom_id), "")]
    for target, o in report.request(custom_id).items():
        figures = " · ".join(filter(None, [f"status {o.status}" if o.status else "no answer",
                                           o.finish_reason and f"finish {o.finish_reason}",
                                           o.latency is not None and f"{o.latency:.2f} s",
                                           o.similarity is not None and f"similarity {o.similarity}",
                                           o.exact_match is not None and ("exact" if o.exact_match else "differs"),
                                           o.error]))
        columns.append((target, o.text, figures))
    cells = "".join(f"<div class='tgi-migration-answer' style='flex:1 1 0;min-width:180px;margin:4px'>"
                    f"<b>{html.escape(label)}</b><div style='font-size:11px;color:#6b7280'>{html.escape(figures)}</div>"
                    f"<pre style='white-space:pre-wrap;font-size:12px'>{html.escape(text or '–')}</pre></div>"
                    for label, text, figures in columns)
    return (f"<div class='tgi-migration-detail'><div style='font-size:12px'><b>{html.escape(item.url)}</b> "
            f"{html.escape(json.dumps(settings)[:300])}</div>"
            f"<pre style='white-space:pre-wrap;font-size:12px'>{html.escape(_request_text(item)[:2000])}</pre>"
            f"<div style='display:flex'>{cells}</div></div>")
