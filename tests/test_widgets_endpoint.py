"""EndpointWidget, MonitorWidget, CompareWidget and the workbench against real endpoints and servers on the
tiny random llama: the form creates an endpoint, the badge follows its life cycle, the buttons act on it,
the monitor reads /metrics, compare runs prompts through several settings, and closing stops every thread.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import threading
import time

import pytest
from server_fixtures import engine, listening, server, wait_until  # noqa: F401

import tgi_nb
from tgi_nb.widgets import ChatWidget, CompareWidget, EndpointWidget, MonitorWidget
from tgi_nb.widgets.monitor import histogram_quantile, parse_metrics

TIMEOUT = 300


def widget_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("tgi_nb-monitor", "tgi_nb-endpoint-",
                                                                         "tgi_nb-chat", "tgi_nb-compare"))]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama"))


@pytest.mark.filterwarnings("ignore:MAX_TOTAL_TOKENS=100000:tgi_nb.endpoints.EndpointWarning")
def test_form_creates_an_endpoint_and_follows_its_life_cycle(tiny):
    form = EndpointWidget(name="widget-form", repository=tiny)
    form.limits["MAX_TOTAL_TOKENS"].value = "100000"  # more than the model's context: lowered, with a warning
    form.limits["MAX_BATCH_TOTAL_TOKENS"].value = "4096"
    code = html.unescape(form.code.value)
    assert "create_inference_endpoint(" in code and "'MAX_TOTAL_TOKENS': '100000'" in code
    assert "no endpoint" in form.badge.value
    assert form.token.layout.display == "none"  # a public endpoint needs no token: the field shows for protected
    assert all(f.layout.display in (None, "") for f in (form.name, form.repository, form.url))  # only the token
    form.type.value = "protected"
    assert form.token.layout.display == ""
    form.type.value = "public"
    form.create()
    try:
        assert form.wait_status("running", timeout=TIMEOUT) == "running"
        endpoint = form.endpoint
        assert endpoint is tgi_nb.get_inference_endpoint("widget-form")
        assert "data-status='running'" in form.badge.value
        assert f"{endpoint.url}/docs" in form.links.value and endpoint.url in form.links.value
        # the limits in words, sizes in GiB / MiB rather than raw bytes
        assert "Prompts up to " in form.progress.value and "KV cache " in form.progress.value
        assert "kv_cache_bytes" not in form.progress.value and "iB" in form.progress.value
        assert wait_until(lambda: "MAX_TOTAL_TOKENS" in form.warnings.value, TIMEOUT), form.warnings.value
        chat = ChatWidget(endpoint, parameters={"max_tokens": 3})
        chat.send("Hi").wait(TIMEOUT)
        assert chat.last_stats["tokens"] == 3

        form.action_buttons["pause"].click()
        form.wait_status("paused", timeout=TIMEOUT)
        assert form.action_buttons["pause"].disabled and not form.action_buttons["resume"].disabled
        chat.send("Hi").wait(TIMEOUT)  # a paused endpoint answers 503: shown in the chat, which goes on
        assert chat.last_stats["error"].startswith("503: ") and chat.transcript.entries[-1]["role"] == "error"

        form.action_buttons["resume"].click()
        form.wait_status("running", timeout=TIMEOUT)
        chat.send("Hi").wait(TIMEOUT)
        assert chat.last_stats["error"] is None

        form.action_buttons["scale_to_zero"].click()
        form.wait_status("scaledToZero", timeout=TIMEOUT)
        port = endpoint._backend.port
        form.action_buttons["delete"].click()
        form.wait_status("deleted", timeout=TIMEOUT)
        assert wait_until(lambda: not listening(port), TIMEOUT)
        assert all(button.disabled for button in form.action_buttons.values())
    finally:
        form.close()
        if form.endpoint is not None:
            form.endpoint.delete()
    assert wait_until(lambda: not widget_threads(), 60), widget_threads()


def test_a_status_change_is_pushed_to_the_widget_and_nothing_polls(tiny, record_property):
    """The badge follows a local endpoint by subscription: the status trait changes on the status machine's
    notifier thread, right after the transition, and no thread polls the endpoint. The latency is recorded
    (``status_latency_ms``), not asserted: the machine is a loaded 2-core one."""
    endpoint = tgi_nb.create_inference_endpoint("widget-push", repository=tiny, type="public",
                                                env={"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "4096"})
    form = EndpointWidget(endpoint)
    try:
        assert form.wait_status("running", timeout=TIMEOUT) == "running"
        drawn: list[tuple[float, str]] = []
        paused = threading.Event()

        def on_status(change):
            if change["new"] == "paused":
                drawn.append((time.monotonic(), threading.current_thread().name))
                paused.set()

        form.observe(on_status, "status")
        threads = [t.name for t in threading.enumerate()]
        assert not [name for name in threads if name.startswith(("tgi_nb-watch-", f"tgi_nb-endpoint-{endpoint.name}"))]
        assert endpoint._backend.pushes
        endpoint.pause()
        assert paused.wait(TIMEOUT)
        (at, thread), = drawn
        assert thread == "tgi_nb-endpoint-status"  # pushed by the machine's notifier, not found by a poll
        latency_ms = (at - endpoint._machine.changed_at) * 1000
        record_property("status_latency_ms", round(latency_ms, 2))
        print(f"\nstatus change to the widget's trait: {latency_ms:.2f} ms")
        assert not form.action_buttons["resume"].disabled and form.action_buttons["pause"].disabled
    finally:
        form.close()
        endpoint.delete()


def test_load_logs_lower_the_logger_level_once_and_restore_it():
    """Two forms loading at once: the tgi_nb logger lets INFO through while either listens, and gets its own
    level back when the last stops, whichever order they stop in and however often."""
    from tgi_nb.widgets.endpoint import _LoadLog

    logger = logging.getLogger("tgi_nb")
    saved = logger.level
    logger.setLevel(logging.WARNING)
    try:
        first, second = _LoadLog(lambda: None).attach(), _LoadLog(lambda: None).attach()
        assert logger.level == logging.INFO
        first.detach()
        first.detach()
        assert logger.level == logging.INFO
        logging.getLogger("tgi_nb.models").info("loading weights")
        assert second.lines == ["loading weights"] and first.lines == []
        second.detach()
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(saved)


def test_form_errors_name_the_field(tiny):
    form = EndpointWidget(repository=tiny)
    form.limits["MAX_INPUT_TOKENS"].value = "lots"
    assert "MAX_INPUT_TOKENS: must be a positive integer or empty" in form.error.value
    form.create()
    assert form.endpoint is None
    form.limits["MAX_INPUT_TOKENS"].value = ""
    form.name.value = "bad/name"
    form.create()  # create_inference_endpoint's own error, shown under the form
    assert wait_until(lambda: "name: must be a non-empty string without" in form.error.value, 60), form.error.value
    form.name.value, form.repository.value = "widget-fails", "/nonexistent/model"
    form.create()  # accepted, then the load fails: the badge says so, with the reason
    try:
        assert form.wait_status("failed", timeout=TIMEOUT) == "failed"
        assert "data-status='failed'" in form.badge.value and "/nonexistent/model" in form.progress.value
        assert not form.action_buttons["resume"].disabled  # a failed endpoint can be retried
    finally:
        form.close()
        form.endpoint.delete()


def test_pick_a_running_endpoint_and_workbench_tabs(tiny):
    endpoint = tgi_nb.create_inference_endpoint("widget-pick", repository=tiny, type="public",
                                                env={"MAX_TOTAL_TOKENS": "512", "MAX_BATCH_TOTAL_TOKENS": "4096"})
    bench = tgi_nb.workbench()
    try:
        assert bench.titles == ("Endpoint", "Parameters", "Chat", "Compare", "Monitor", "RAG", "Migration")
        form = bench.endpoint_widget
        form.refresh_running()
        assert "widget-pick" in [value for _, value in form.running.options]
        form.running.value = "widget-pick"
        form.pick_button.click()
        assert form.endpoint is endpoint
        assert form.wait_status("running", timeout=TIMEOUT) == "running"
        bench.parameters.set(max_tokens=4, temperature=0.0)
        bench.chat.send("Hello").wait(TIMEOUT)
        assert bench.chat.last_stats["tokens"] == 4
        # Running: the Endpoint tab points to the Chat tab, the curl command names the endpoint's real URL, and
        # the endpoint's defaults (none for this model) never undo a value the user set.
        assert bench.next_step.layout.display == ""
        bench.next_step.children[1].click()
        assert bench.selected_index == 2
        assert wait_until(lambda: bench.parameters.base_url == endpoint.url + "/v1", TIMEOUT)
        assert f"curl {endpoint.url}/v1/chat/completions" in html.unescape(bench.parameters.code.value)
        bench.parameters.use_endpoint_defaults({"temperature": 0.2, "top_p": 0.9})
        assert bench.parameters.params == {"temperature": 0.0, "max_tokens": 4}  # top_p 0.9: the endpoint's own
        assert bench.parameters.controls["top_p"].value == 0.9
        assert wait_until(lambda: (bench.monitor.latest.get("kv_free") or 0) > 0, TIMEOUT)
    finally:
        bench.close()
        endpoint.delete()
    assert wait_until(lambda: not widget_threads(), 60), widget_threads()


def test_monitor_reads_metrics_and_stops_when_closed(server):
    monitor = MonitorWidget(server.url, interval=0.2)
    assert wait_until(lambda: len(monitor.scrapes) >= 1, TIMEOUT)  # a scrape before the request
    chat = ChatWidget(server.url, parameters={"max_tokens": 30})
    chat.send("Hello").wait(TIMEOUT)
    # A scrape after the request: its TTFT is in the last minute's percentiles, the batch is empty again.
    assert wait_until(lambda: monitor.latest.get("ttft_p50") is not None and monitor.latest["running"] == 0,
                      TIMEOUT), monitor.latest
    assert monitor.latest["kv_free"] > 0 and max(v for _, v in monitor.series["tokens_per_s"]) > 0
    assert monitor.latest["kv_percent"] == 0.0 and max(v for _, v in monitor.series["kv_percent"]) <= 100
    # one request's speed from the inter-token latencies: the chat's own figure, measured by the server
    assert monitor.latest["request_tokens_per_s"] > 0
    plots = monitor.plots.value
    assert "tgi-monitor-plot" in plots and "time to first token (1 min)" in plots and "KV cache in use" in plots
    assert "-1 min" in plots and "now" in plots and "e+0" not in plots and "e-0" not in plots  # axes, no 1e-09
    assert monitor.polling
    monitor.close()
    assert not monitor.polling


def test_monitor_shows_a_hostile_servers_error_as_text():
    """A server connect()ed to answers 500 with markup in its reason phrase (httpx puts it in the error): the
    header shows it as text, so no script runs in JupyterLab's origin."""
    import http.server

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500, "<img src=x onerror=alert(document.cookie)>")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    hostile = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    monitor = MonitorWidget(f"http://127.0.0.1:{hostile.server_address[1]}", interval=0.2)
    try:
        assert wait_until(lambda: monitor.error is not None, 60)
        assert "<img" in monitor.error and "<img" not in monitor.header.value
        assert "&lt;img src=x onerror=alert(document.cookie)&gt;" in monitor.header.value
    finally:
        monitor.close()
        hostile.shutdown()
        hostile.server_close()


def test_monitor_shows_an_unreachable_server():
    monitor = MonitorWidget("http://127.0.0.1:9", interval=0.2)
    assert wait_until(lambda: monitor.error is not None, 60)
    assert "127.0.0.1:9/metrics" in monitor.header.value
    monitor.close()


def test_histogram_quantile_between_snapshots():
    text = ('tgi_request_time_to_first_token_seconds_bucket{le="0.1"} 4\n'
            'tgi_request_time_to_first_token_seconds_bucket{le="0.5"} 10\n'
            'tgi_request_time_to_first_token_seconds_bucket{le="+Inf"} 10\n')
    buckets = parse_metrics(text).buckets["ttft"]
    assert histogram_quantile(0.4, buckets, []) == 0.1
    assert histogram_quantile(0.5, buckets, [(0.1, 4.0), (0.5, 4.0), (float("inf"), 4.0)]) == 0.3
    assert histogram_quantile(0.5, buckets, buckets) is None


def test_compare_runs_prompts_through_each_setting(server):
    compare = CompareWidget([(server.url, {"temperature": 0.0}), (server.url, {"max_tokens": 2})],
                            prompts=["one", "two"], parameters={"max_tokens": 5})
    compare.run().wait(TIMEOUT)
    assert [(r["prompt"], r["tokens"]) for r in compare.results] == [("one", 5), ("one", 2), ("two", 5), ("two", 2)]
    assert all(r["answer"] and r["error"] is None and r["ttft_s"] is not None for r in compare.results)
    table = compare.table.value
    # the prompt once above its answers (not in every row), answers in full in their tooltip
    assert table.count("<tr>") == 5 and table.count("<tr class='tgi-compare-prompt'>") == 2 and table.count("Prompt:") == 2
    assert "temperature=0.0" in table and "max_tokens=2" in table
    # exports: CSV (a download link) and a DataFrame, a row per prompt and setting
    rows = list(csv.DictReader(io.StringIO(compare.to_csv())))
    assert [(r["prompt"], r["tokens"]) for r in rows] == [("one", "5"), ("one", "2"), ("two", "5"), ("two", "2")]
    assert 'download="compare.csv"' in compare.exports.value
    frame = compare.to_dataframe()
    assert frame.shape == (4, len(CompareWidget.COLUMNS)) and list(frame["tokens"]) == [5, 2, 5, 2]
    # each column shows every prompt and its answer
    assert [e["role"] for e in compare.chats[0].transcript.entries] == ["user", "assistant"] * 2
    compare.close()
    with pytest.raises(ValueError, match="targets: compare needs at least 2 targets, got 1"):
        CompareWidget([server.url])


def test_rerunning_a_cell_closes_what_it_made(tmp_path, server):
    """In a real kernel, a cell run twice (JupyterLab sends the cell's id with each run) leaves one monitor
    polling, not two; widgets made by one run (a compare and its chats) stay open together."""
    from test_endpoints_kernel import Kernel

    kernel = Kernel(tmp_path)

    def run_cell(code: str, cell_id: str = "cell-1") -> str:
        kc = kernel.kc
        msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                                 "user_expressions": {}, "allow_stdin": False,
                                                 "stop_on_error": True}, metadata={"cellId": cell_id})
        kc.shell_channel.send(msg)
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["content"]["status"] == "ok", reply["content"]
        return kernel.run("print(sorted(t.name for t in threading.enumerate() if t.name.startswith('tgi_nb-')))")

    try:
        kernel.run("import threading\nfrom tgi_nb.widgets import CompareWidget, MonitorWidget")
        make = (f"monitor = MonitorWidget({server.url!r}, interval=0.2)\n"
                f"compare = CompareWidget([{server.url!r}, {server.url!r}])\n"
                "alive = [not c.transcript.comm is None for c in compare.chats]")
        assert run_cell(make).count("tgi_nb-monitor") == 1
        assert run_cell(make).count("tgi_nb-monitor") == 1  # the first run's monitor was closed
        assert "[True, True]" in kernel.run("print(alive)")  # both chats of one run stay open
        assert run_cell(make, cell_id="cell-2").count("tgi_nb-monitor") == 2  # another cell: its own monitor
    finally:
        kernel.shutdown()
