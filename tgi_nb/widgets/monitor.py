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
COUNTERS = {"generated": "tgi_engine_generated_tokens", "requests": "tgi_request_count"}
HISTOGRAMS = {"ttft": "tgi_request_time_to_first_token_seconds", "itl": "tgi_request_inter_token_latency_seconds"}


@dataclass
class Scrape:
    """One read of /metrics: gauges, counters (summed over labels) and cumulative histogram buckets."""

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


def _number(value: float) -> str:
    """Counts as integers (8192, not 8.19e+03), other values with three significant digits."""
    return f"{value:.0f}" if value == int(value) else f"{value:.3g}"


def sparkline(points: list[tuple[float, float]], title: str, unit: str = "", width: int = 300,
              height: int = 60, span: float = HISTORY_SECONDS) -> str:
    """An SVG line of (time, value) points over the last ``span`` seconds, with its title and last value.

    Example:
        >>> "<svg" in sparkline([(0, 1), (1, 2)], "running")
        True
    """
    last = _number(points[-1][1]) + unit if points else "–"
    svg = [f"<svg width='{width}' height='{height}' style='background:var(--jp-layout-color2,#f9fafb)'>"]
    if len(points) > 1:
        t_end = points[-1][0]
        top = max(v for _, v in points)
        scale = top if top > 0 else 1.0
        coords = " ".join(f"{width - (t_end - t) / span * width:.1f},{height - 4 - v / scale * (height - 16):.1f}"
                          for t, v in points)
        svg.append(f"<polyline fill='none' stroke='#2563eb' stroke-width='1.5' points='{coords}'/>")
        svg.append(f"<text x='4' y='10' font-size='9' fill='#6b7280'>max {_number(top)}{unit}</text>")
    svg.append("</svg>")
    return (f"<div class='tgi-monitor-plot' style='display:inline-block;margin:4px'>"
            f"<div style='font-size:12px'>{html.escape(title)}: <b>{last}</b></div>{''.join(svg)}</div>")


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
        charts = (("running", "running requests", ""), ("waiting", "waiting requests", ""),
                  ("kv_used", "KV blocks used", ""), ("kv_free", "KV blocks free", ""),
                  ("tokens_per_s", "output tokens/s", ""), ("ttft_p50", "TTFT p50 (1 min)", " s"),
                  ("ttft_p99", "TTFT p99 (1 min)", " s"), ("itl_p50", "inter-token p50 (1 min)", " s"),
                  ("itl_p99", "inter-token p99 (1 min)", " s"))
        self.plots.value = "".join(sparkline(list(self.series.get(key, ())), title, unit)
                                   for key, title, unit in charts)

    def _show_header(self, text: str) -> None:
        self.header.value = f"<b>Monitor</b> {html.escape(self.target.label)} &middot; {text}"

    def close(self) -> None:
        """Stop refreshing."""
        if getattr(self, "_poller", None) is not None:
            self._poller.stop()
        super().close()
