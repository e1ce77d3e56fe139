"""MigrationWidget against a real server on the tiny random llama (float64: greedy answers do not depend on what
else runs), through the real openai client: loading a workload (path and upload), picking targets, a replay in
a background thread with progress, the report's tables and charts, one request side by side, the export, and
Stop. Widgets run without a front-end here; tests/test_widgets_browser.py drives it in JupyterLab."""

from __future__ import annotations

import base64
import datetime
import json
import re

import openai
import pytest

from server_fixtures import GatedEngine, running_server, wait_until
from server_fixtures import engine64  # noqa: F401  (module-scoped fixture)
from tgi_nb import migrate
from tgi_nb.widgets import MigrationWidget

TIMEOUT = 120


@pytest.fixture(scope="module")
def engine(engine64):
    return engine64


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as (server, _):
        yield server


@pytest.fixture(scope="module")
def recorded(server, tmp_path_factory):
    """A workload recorded against the server: three greedy chats and a completion."""
    path = tmp_path_factory.mktemp("workload") / "workload.jsonl"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    with migrate.record(client, path) as recording:
        for text in ("Hi", "Name a colour", "Count to three"):
            recording.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": text}],
                                              max_tokens=5, temperature=0)
        recording.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon", max_tokens=4, temperature=0)
    return path


def test_replay_in_the_background_with_the_report(server, recorded):
    widget = MigrationWidget([server.url, (server.url, {"temperature": 0.9, "seed": 1})])
    assert widget.run_button.disabled is False
    widget.path.value = str(recorded)
    widget.load_button.click()
    assert "<b>4</b> requests" in widget.workload_info.value and "4 with a recorded answer" in widget.workload_info.value
    assert widget.request_picker.options == ("request-1", "request-2", "request-3", "request-4")
    assert len(widget.picker.value) == 2 and "temperature=0.9" in widget.code.value

    widget.run_button.click()   # returns at once: the replay runs in a thread
    widget.wait(TIMEOUT)
    assert widget.error is None, widget.error
    assert widget.progress.value == widget.progress.max == 8 and "8/8 done" in widget.status.value
    report = widget.report
    same = report.targets[0]
    assert report.summary()[0]["exact_match"] == "4/4"          # the server that recorded, greedy again
    assert f"<td>{same}</td>" in widget.summary.value and "Reference: the recorded answers" in widget.summary.value
    assert widget.plots.value.count("<svg") == 3 and "latency p50" in widget.plots.value
    assert widget.table.value.count("<tr>") == 1 + 8
    links = re.findall(r"download='([^']+)' href='data:[^;]+;base64,([^']+)'", widget.export.value)
    assert [name for name, _ in links] == ["migration_report.md", "migration_report.csv"]
    csv_text = base64.b64decode(links[1][1]).decode()
    assert csv_text.splitlines()[0].startswith("custom_id,target") and len(csv_text.splitlines()) == 9

    widget.request_picker.value = "request-2"
    detail = widget.detail.value
    assert "Name a colour" in detail and detail.count("tgi-migration-answer") == 3   # the reference and both targets
    assert "exact" in detail
    widget.close()


def uploaded(name: str, content: bytes) -> dict:
    """A file as ipywidgets' FileUpload holds it once the browser sent it."""
    return {"name": name, "type": "application/json", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


def test_upload_with_its_answers_and_errors_shown(server, recorded):
    widget = MigrationWidget(server.url)
    answers = recorded.with_name("workload.responses.jsonl")
    widget.upload.value = tuple(uploaded(p.name, p.read_bytes()) for p in (recorded, answers))
    assert "4 with a recorded answer" in widget.workload_info.value
    widget.upload.value = (uploaded("a.txt", b"{}"), uploaded("b.txt", b"{}"))
    assert "one workload file" in widget.status.value               # shown, not raised into the front-end
    widget.picker.value = ()
    widget.run_button.click()
    assert "select at least one target" in widget.status.value and not widget.busy
    widget.close()


def test_stop_sends_no_more_requests(engine, recorded):
    gated = GatedEngine(engine)
    try:
        with running_server(gated) as (server, _):
            widget = MigrationWidget(server.url, recorded, concurrency=1)
            widget.run()
            assert widget.busy and widget.stop_button.disabled is False
            assert wait_until(lambda: gated.submitted == 1)  # the first request is in the engine, held there
            widget.stop_button.click()
            gated.gate.set()
            widget.wait(TIMEOUT)
            assert widget.replay.stopped and widget.replay.done == 1 and widget.replay.total == 4
            assert "(stopped)" in widget.status.value and widget.run_button.disabled is False
    finally:
        gated.gate.set()


def test_running_endpoints_are_offered(server, monkeypatch):
    import tgi_nb.widgets.migration as module

    class Running:
        name, status, url = "local-endpoint", "running", server.url

    endpoint = Running()
    monkeypatch.setattr(module, "_running_endpoints", lambda: [endpoint])
    widget = MigrationWidget(workload=[{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}])
    assert widget.picker.options == ("local-endpoint",) and widget.selected == [endpoint]
    widget.url.value = "http://127.0.0.1:9"
    widget.add_button.click()
    assert widget.picker.options == ("local-endpoint", "127.0.0.1:9") and len(widget.selected) == 2
    assert json.dumps(widget.workload[0].body)
    widget.close()
