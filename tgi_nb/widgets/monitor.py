"""``MonitorWidget``: a live view of a server from its own ``/metrics`` (TGI's metric names), about once a
second, plotted over the last minutes. Scraping ``/metrics`` rather than reading the engine makes it work the
same on a remote TGI or a ``connect()``-ed tgi_nb.
"""

from __future__ import annotations

import html
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import ipywidgets as w

from .lifecycle import Poller, replace_in_cell
from .target import Target

HISTORY_SECONDS = 300
WINDOW_SECONDS = 60  # latency percentiles over the last minute

GAUGES = {"running": "tgi_batch_current_size", "waiting": "tgi_queue_size", "kv_used": "tgi_kv_blocks_used",
          "kv_free": "tgi_kv_blocks_free", "in_flight": "tgi_requests_in_flight"}
# The figures drawn: (title, {legend: series key}, unit); KV use as a percentage of the cache.
CHARTS = (("requests", {"running": "running", "waiting": "waiting"}, ""),
          ("KV cache in use", {"used": "kv_percent"}, "%"),
          ("output tokens/s", {"all requests": "tokens_per_s"}, ""),
          ("time to first token (1 min)", {"p50": "ttft_p50", "p99": "ttft_p99"}, " s"),
          ("inter-token latency (1 min)", {"p50": "itl_p50", "p99": "itl_p99"}, " s"))
COUNTERS = {"generated": "tgi_engine_generated_tokens", "requests": "tgi_request_count"}
HISTOGRAMS = {"ttft": "tgi_request_time_to_first_token_seconds", "itl": "tgi_request_inter_token_latency_seconds"}


@dataclass
class Scrape:
    """One read of /metrics: gauges, counters (summed over labels), cumulative histogram buckets, and each
    histogram's sum and count (``values["<name>_sum"]``, ``values["<name>_count"]``)."""

    at: float
    values: dict[str, float]
    buckets: dict[str, list[tuple[float, float]]]


def parse_metrics(text: str, at: Optional[float] = None) -> Scrape:
    """The figures the monitor plots, from a Prometheus exposition text.

    Example:
        >>> s = parse_metrics("tgi_queue_size 2\\n"
        ...                   'tgi_request_count_total{route="chat"} 5\\n')
        >>> s.values["waiting"], s.values["requests"]
        (2.0, 5.0)
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {v: k for k, v in {**GAUGES, **COUNTERS}.items()}
    histograms = {v: k for k, v in HISTOGRAMS.items()}
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name.endswith("_total"):
                name = name[: -len("_total")]
            if name in wanted:
                key = wanted[name]
                values[key] = values.get(key, 0.0) + sample.value
            elif name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in histograms:
                key = f"{histograms[name.rsplit('_', 1)[0]]}_{name.rsplit('_', 1)[1]}"
                values[key] = values.get(key, 0.0) + sample.value
            elif name.endswith("_bucket") and name[: -len("_bucket")] in histograms:
                key = histograms[name[: -len("_bucket")]]
                bound = float(sample.labels["le"])
                buckets.setdefault(key, {})
                buckets[key][bound] = buckets[key].get(bound, 0.0) + sample.value
    return Scrape(at if at is not None else time.monotonic(), values,
                  {k: sorted(v.items()) for k, v in buckets.items()})


def histogram_quantile(q: float, now: list[tuple[float, float]], before: list[tuple[float, float]]) -> Optional[float]:
    """The ``q`` quantile of the observations between two cumulative bucket snapshots, interpolated within
    a bucket as Prometheus does; None when nothing was observed.

    Example:
        >>> histogram_quantile(0.5, [(0.1, 0), (0.2, 10), (math.inf, 10)], [])
        0.15
    """
    old = dict(before)
    counts = [(bound, count - old.get(bound, 0.0)) for bound, count in now]
    total = counts[-1][1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in counts:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return round(lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count), 6)
        lower_bound, lower_count = bound, count
    return lower_bound


def _number(value: float, unit: str = "") -> str:
    """A value as people read it: seconds in ms below one second, percentages and counts rounded, others with
    three significant digits (never 1e-09 or 8.19e+03).

    Example:
        >>> _number(0.0123, " s"), _number(8192), _number(42.37, "%"), _number(1e-9, " s")
        ('12 ms', '8192', '42%', '0 ms')
    """
    if unit == " s" and value < 1:
        return f"{value * 1000:.0f} ms"
    if unit == "%" or value >= 100 or value == int(value):
        return f"{value:.0f}{unit}"
    return f"{value:.3g}{unit}"


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value``: a y axis' top tick."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 2.5, 5, 10) if step * power >= value)


COLORS = ("#2563eb", "#d97706")


def sparkline(lines: dict[str, list[tuple[float, float]]], title: str, unit: str = "", width: int = 280,
              height: int = 90, span: float = HISTORY_SECONDS, top: Optional[float] = None, note: str = "") -> str:
    """An SVG chart of one or two series of (time, value) points over the last ``span`` seconds, with a y
    axis (0 and its top tick), a time axis (minutes ago) and each series' last value in the title.

    Example:
        >>> chart = sparkline({"running": [(0, 1), (1, 2)]}, "requests")
        >>> "<svg" in chart and "running <b>2</b>" in chart and "now" in chart
        True
    """
    left, bottom, right = 46, 14, 6  # room for a y label such as "500 ms" or "2.5 s"
    plot_w, plot_h = width - left - right, height - bottom - 6
    points = [p for series in lines.values() for p in series]
    t_end = max((t for t, _ in points), default=0.0)
    y_top = top if top is not None else _nice_top(max((v for _, v in points), default=0.0))
    svg = [f"<svg width='{width}' height='{height}' style='background:var(--jp-layout-color2,#f9fafb)' "
           f"font-size='9' fill='var(--jp-ui-font-color2,#6b7280)'>"]
    for value, y in ((y_top, 6), (0, 6 + plot_h)):  # y ticks: the top and 0
        svg.append(f"<text x='{left - 3}' y='{y + 3}' text-anchor='end'>{_number(value, unit)}</text>"
                   f"<line x1='{left}' x2='{left + plot_w}' y1='{y}' y2='{y}' stroke='#d1d5db' stroke-width='0.5'/>")
    for minutes in range(int(span // 60) + 1):  # the time axis: minutes ago, now at the right
        x = left + plot_w - minutes * 60 / span * plot_w
        label = "now" if minutes == 0 else f"-{minutes} min"
        svg.append(f"<text x='{x:.0f}' y='{height - 2}' text-anchor='{'end' if minutes == 0 else 'middle'}'>"
                   f"{label}</text>")
    legend = []
    for (name, series), color in zip(lines.items(), COLORS):
        if len(series) > 1:
            coords = " ".join(f"{left + plot_w - (t_end - t) / span * plot_w:.1f},"
                              f"{6 + plot_h - min(v / y_top, 1.0) * plot_h:.1f}" for t, v in series)
            svg.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{coords}'/>")
        last = _number(series[-1][1], unit) if series else "–"
        legend.append(f"<span style='color:{color}'>{html.escape(name)} <b>{last}</b></span>")
    svg.append("</svg>")
    extra = f"<div style='font-size:11px;opacity:0.8'>{note}</div>" if note else ""
    return (f"<div class='tgi-monitor-plot' style='display:inline-block;margin:4px;vertical-align:top'>"
            f"<div style='font-size:12px'>{html.escape(title)}: {' · '.join(legend)}</div>{''.join(svg)}{extra}</div>")


class MonitorWidget(w.VBox):
    """Live charts of a server's load from its ``/metrics``: running and waiting requests, KV blocks used and
    free, output tokens/s, TTFT and inter-token latency percentiles (last minute), refreshed every
    ``interval`` seconds in a background thread until ``close()``.

    Example:
        >>> from tgi_nb.widgets import MonitorWidget
        >>> monitor = MonitorWidget(endpoint)        # doctest: +SKIP
        >>> monitor.latest["kv_used"]                # doctest: +SKIP
        3.0
        >>> monitor.close()                          # doctest: +SKIP
    """

    def __init__(self, target: Any, *, interval: float = 1.0, api_key: Optional[str] = None):
        if interval <= 0:
            raise ValueError(f"interval: must be a positive number of seconds, got {interval!r}")
        self.target = Target.of(target, api_key=api_key)
        self.interval = interval
        self.scrapes: deque[Scrape] = deque()
        self.series: dict[str, deque[tuple[float, float]]] = {}
        self.latest: dict[str, Optional[float]] = {}
        self.error: Optional[str] = None
        self.header = w.HTML()
        self.plots = w.HTML()
        self.plots.add_class("tgi-monitor-plots")
        super().__init__([self.header, self.plots])
        self.add_class("tgi-monitor")
        self._started = time.monotonic()
        self._poller = Poller(interval, self.refresh, name="monitor").start()
        replace_in_cell(self)

    @property
    def polling(self) -> bool:
        """True until ``close()`` stopped the background refresh."""
        return self._poller.alive

    def metrics_url(self) -> Optional[str]:
        base = self.target.base_url
        return None if base is None else base[: -len("/v1")] + "/metrics"

    def refresh(self) -> None:
        """Scrape /metrics once and redraw (the background thread calls this every ``interval`` seconds)."""
        import httpx

        url = self.metrics_url()
        if url is None:
            self._show_header("waiting for the endpoint to get a URL")
            return
        token = self.target.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = httpx.get(url, headers=headers, timeout=5)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            self.error = f"{url}: {exc}"
            self._show_header(html.escape(self.error))   # the server's reason phrase is in it: text, never markup
            return
        self.error = None
        self._add(parse_metrics(response.text))
        self._show_header(f"<code>{html.escape(url)}</code> every {self.interval:g} s")

    def _add(self, scrape: Scrape) -> None:
        previous = self.scrapes[-1] if self.scrapes else None
        self.scrapes.append(scrape)
        while self.scrapes and scrape.at - self.scrapes[0].at > HISTORY_SECONDS:
            self.scrapes.popleft()
        window_start = next((s for s in self.scrapes if scrape.at - s.at <= WINDOW_SECONDS), scrape)
        latest: dict[str, Optional[float]] = {k: scrape.values.get(k) for k in GAUGES}
        latest["tokens_per_s"] = None
        if previous is not None and scrape.at > previous.at and "generated" in scrape.values:
            delta = scrape.values["generated"] - previous.values.get("generated", 0.0)
            latest["tokens_per_s"] = max(delta, 0.0) / (scrape.at - previous.at)
        for key in HISTOGRAMS:
            for q in (0.5, 0.99):
                latest[f"{key}_p{int(q * 100)}"] = histogram_quantile(
                    q, scrape.buckets.get(key, []), window_start.buckets.get(key, []) if window_start is not scrape
                    else [])
        used, free = latest.get("kv_used"), latest.get("kv_free")
        latest["kv_percent"] = 100.0 * used / (used + free) if used is not None and free and used + free else (
            0.0 if used == 0 else None)
        # One request's decoding speed, as the chat measures it: 1 / the mean inter-token latency (last minute).
        count = scrape.values.get("itl_count", 0.0) - window_start.values.get("itl_count", 0.0)
        total = scrape.values.get("itl_sum", 0.0) - window_start.values.get("itl_sum", 0.0)
        latest["request_tokens_per_s"] = count / total if window_start is not scrape and count > 0 and total > 0 \
            else None
        self.latest = latest
        t = scrape.at - self._started
        for key, value in latest.items():
            if value is not None:
                series = self.series.setdefault(key, deque())
                series.append((t, value))
                while series and t - series[0][0] > HISTORY_SECONDS:
                    series.popleft()
        self._draw()

    def _draw(self) -> None:
        speed = self.latest.get("request_tokens_per_s")
        notes = {"output tokens/s": f"one request: <b>{speed:.1f} tok/s</b> (1 / mean inter-token latency, 1 min;"
                                    " the chat's figure)" if speed else ""}
        self.plots.value = "".join(
            sparkline({name: list(self.series.get(key, ())) for name, key in lines.items()}, title, unit,
                      top=100.0 if unit == "%" else None, note=notes.get(title, ""))
            for title, lines, unit in CHARTS)

    def _show_header(self, text: str) -> None:
        self.header.value = f"<b>Monitor</b> {html.escape(self.target.label)} &middot; {text}"

    def close(self) -> None:
        """Stop refreshing."""
        if getattr(self, "_poller", None) is not None:
            self._poller.stop()
        super().close()
