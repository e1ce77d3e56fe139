"""The workbench in a real JupyterLab, driven in Debian's Chromium with Playwright, as a user would: open
notebooks/00_workbench.ipynb, run it, create an endpoint from the form, chat (the answer grows over several
renders), stop a long answer, move a slider and see the next request use it, open /docs through
jupyter-server-proxy.

Needs /usr/bin/chromium (``apt-get install chromium``; ``make test`` installs it when run as root) and the
playwright package (never ``playwright install``: it downloads a browser). The endpoint serves the tiny random
llama by default (fast on a loaded machine); ``TGI_NB_BROWSER_MODEL=bundled`` keeps the form's default, the
real SmolLM2, for screenshots worth showing. Screenshots and the measured update rate go to
``TGI_NB_SCREENSHOTS`` (default: a pytest temporary folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from jupyter_lab import CHROMIUM, KERNEL_IDLE, REPO, running_lab
TIMEOUT_MS = 300_000  # generous: the machine may be loaded; nothing here measures speed

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - reported by the skip below
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    sync_playwright is None or not os.access(CHROMIUM, os.X_OK),
    reason="browser tests need Debian's chromium and playwright: `apt-get install chromium` (as root) and "
           "`pip install playwright` (`make test` does both when run as root)")

# A MutationObserver on the transcript: each time the streaming reply's text grew is one render.
OBSERVE_RENDERS = """() => {
  window.tgiRenders = [];
  const transcript = document.querySelector('.tgi-workbench .tgi-chat .tgi-chat-transcript');
  new MutationObserver(() => {
    const body = transcript.querySelector('.tgi-chat-streaming .tgi-chat-body');
    const renders = window.tgiRenders;
    const length = body ? body.textContent.length : 0;
    if (length > (renders.length ? renders[renders.length - 1][1] : 0)) renders.push([performance.now(), length]);
  }).observe(transcript, {childList: true, subtree: true, characterData: true});
}"""
@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TGI_NB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``jupyter lab`` on a free port with a token, serving a copy of notebooks/00_workbench.ipynb; its kernel
    imports this checkout. Yields (base URL, token)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(REPO / "notebooks" / "00_workbench.ipynb", root)
    # endpoint.browser_url through jupyter-server-proxy, as on Binder / JupyterHub
    with running_lab(root, env={"TGI_NB_BROWSER_URL": "/proxy/{port}"}) as (base, token):
        yield base, token


@pytest.fixture(scope="module")
def page(lab, shots, tiny_model_dir):
    """The notebook open in Chromium, run, with an endpoint created from the form and running."""
    base, token = lab
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        expect.set_options(timeout=TIMEOUT_MS)
        page = context.new_page()
        page.goto(f"{base}/lab/tree/00_workbench.ipynb?token={token}")
        page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        form = page.locator(".tgi-workbench .tgi-endpoint")
        expect(form.locator(".tgi-endpoint-create")).to_be_visible()
        if os.environ.get("TGI_NB_BROWSER_MODEL") != "bundled":
            form.locator(".tgi-endpoint-repository input").fill(str(tiny_model_dir("llama")))
        form.locator(".tgi-endpoint-name input").fill("browser-test")
        form.locator(".tgi-endpoint-create").click()
        expect(form.locator(".tgi-endpoint-badge")).to_have_attribute("data-status", "running")
        expect(form.locator(".tgi-endpoint-docs")).to_be_visible()
        form.locator(".tgi-endpoint-status").scroll_into_view_if_needed()
        page.screenshot(path=shots / "workbench_endpoint.png")
        yield page
        context.close()
        browser.close()


def open_tab(page, title: str) -> None:
    page.locator(".tgi-workbench > .lm-TabBar .lm-TabBar-tab", has_text=title).click()


def send(page, text: str, key: str = "") -> None:
    """Type ``text`` into the chat and click Send, or with ``key="Enter"`` press Enter."""
    chat = page.locator(".tgi-workbench .tgi-chat")
    chat.locator(".tgi-chat-input textarea").fill(text)
    if key:
        chat.locator(".tgi-chat-input textarea").press(key)
    else:
        chat.locator(".tgi-chat-send").click()


def replies(page):
    return page.locator(".tgi-workbench .tgi-chat .tgi-chat-assistant:not(.tgi-chat-streaming)")


def set_max_tokens(page, value: int) -> None:
    """Type ``value`` into the max_tokens slider's readout, as a user does for an exact value."""
    open_tab(page, "Parameters")
    readout = page.locator(".tgi-workbench .tgi-param-max-tokens .widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")
    expect(readout).to_have_text(str(value))
    kernel_side(page, value)


def kernel_side(page, max_tokens: int) -> None:
    """Wait until the kernel has the value: the code under the controls is drawn from ``params`` there."""
    expect(page.locator(".tgi-workbench .tgi-param-code")).to_contain_text(f"max_tokens={max_tokens},")


def test_answer_streams_in_several_renders(page, shots):
    set_max_tokens(page, 96)  # long enough to stream for a while, short enough for a loaded machine
    open_tab(page, "Chat")
    page.evaluate(OBSERVE_RENDERS)
    area = page.locator(".tgi-workbench .tgi-chat-input textarea")
    area.fill("Write a Python function that reverses a string,")
    area.press("Shift+Enter")  # a new line, as in chat apps; nothing sent
    area.press_sequentially("and explain it.")
    assert area.input_value() == "Write a Python function that reverses a string,\nand explain it."
    assert replies(page).count() == 0
    area.press("Enter")  # sends
    expect(page.locator(".tgi-workbench .tgi-chat-stop")).to_be_enabled()  # Stop is offered before the first token
    expect(area).to_have_value("")
    expect(replies(page)).to_have_count(1)
    renders = page.evaluate("window.tgiRenders")
    assert len(renders) >= 3, renders  # the answer grew on screen, three times or more, before it ended
    stats = replies(page).last.locator(".tgi-chat-stats").inner_text()
    assert " 96 tokens" in stats and "TTFT" in stats, stats
    seconds = (renders[-1][0] - renders[0][0]) / 1000
    rate = (len(renders) - 1) / seconds if seconds > 0 else float("nan")
    (shots / "update_rate.json").write_text(json.dumps({"renders": len(renders), "seconds": round(seconds, 3),
                                                         "updates_per_second": round(rate, 2), "stats": stats}))
    print(f"\nstreaming updates in the browser: {len(renders)} renders in {seconds:.2f} s = {rate:.1f}/s ({stats})")
    page.screenshot(path=shots / "workbench_chat.png")


def test_stop_ends_a_long_answer(page, shots):
    set_max_tokens(page, 1500)
    open_tab(page, "Chat")
    page.evaluate(OBSERVE_RENDERS)
    send(page, "Tell me a very long story about a dragon who learns to code.")
    page.wait_for_function("window.tgiRenders.length >= 3")
    page.locator(".tgi-workbench .tgi-chat-stop").click()
    stats = replies(page).last.locator(".tgi-chat-stats")
    expect(stats).to_contain_text("stopped")
    assert int(stats.inner_text().split(" tokens")[0].split()[-1]) < 1500
    page.screenshot(path=shots / "workbench_stopped.png")
    # The server aborted the request: its monitor shows no running request and no KV block in use.
    open_tab(page, "Monitor")
    plots = page.locator(".tgi-workbench .tgi-monitor-plots")
    expect(plots).to_contain_text("running 0")
    expect(plots).to_contain_text("KV cache in use: used 0%")
    page.screenshot(path=shots / "workbench_monitor.png")


def test_a_slider_move_is_used_by_the_next_request(page):
    open_tab(page, "Parameters")
    handle = page.locator(".tgi-workbench .tgi-param-max-tokens .noUi-handle")
    handle.focus()
    page.keyboard.press("Home")  # the slider to its minimum, 1, then four steps right
    for _ in range(4):
        page.keyboard.press("ArrowRight")
    expect(page.locator(".tgi-workbench .tgi-param-max-tokens .widget-readout")).to_have_text("5")
    kernel_side(page, 5)
    open_tab(page, "Chat")
    before = replies(page).count()
    send(page, "Hello!")
    expect(replies(page)).to_have_count(before + 1)
    stats = replies(page).last.locator(".tgi-chat-stats").inner_text()
    assert stats.startswith("TTFT") and " 5 tokens" in stats, stats
    assert "finish_reason: length" in stats or "finish_reason: stop" in stats


def test_docs_link_goes_through_jupyter_server_proxy(page, lab):
    base, _ = lab
    open_tab(page, "Endpoint")
    href = page.locator(".tgi-workbench .tgi-endpoint-docs").get_attribute("href")
    assert href.startswith("/proxy/") and href.endswith("/docs")
    response = page.request.get(base + href)  # the page's cookies: the user's Jupyter session
    assert response.status == 200 and "swagger" in response.text().lower()
    # swagger-ui renders the API from the server's own copy of its scripts, under the proxy's prefix (the
    # test machine has no network: a CDN's script would never load)
    docs = page.context.new_page()
    docs.goto(base + href)
    expect(docs.locator(".swagger-ui .info .title")).to_contain_text("tgi_nb")
    expect(docs.locator(".swagger-ui .opblock-summary-path").first).to_be_visible()
    docs.close()


def test_rag_tab_indexes_pasted_text_and_answers_with_sources(page, shots):
    """The RAG tab of the same workbench: paste a document, index it, ask, read the answer and its sources."""
    open_tab(page, "RAG")
    rag = page.locator(".tgi-workbench .tgi-rag")
    expect(rag).to_be_visible()  # built in a background thread once the embedding model loaded
    rag.locator(".tgi-rag-text textarea").fill(
        "The Eiffel Tower is in Paris. It was finished in 1889 for the World's Fair.\n\n"
        "Mount Fuji is the highest mountain in Japan, 3,776 metres high.")
    rag.locator(".tgi-rag-add-text").click()
    indexed = re.compile(r"\b[1-9][0-9]* chunks? indexed")  # not the "0 chunks indexed" shown before
    expect(rag.locator(".tgi-rag-status")).to_contain_text(indexed)
    rag.locator(".tgi-rag-question textarea, .tgi-rag-question input").first.fill("When was the Eiffel Tower finished?")
    rag.locator(".tgi-rag-ask").click()
    # The kernel sends its updates in order: the sources come after "answering...", the status line's
    # "N chunks indexed" again only once the answer ended (an error would show there instead).
    sources = rag.locator(".tgi-rag-sources .tgi-rag-source")
    expect(sources.first).to_contain_text("[1]")
    expect(rag.locator(".tgi-rag-sources")).to_contain_text("Eiffel Tower")  # the closest chunk is cited
    expect(rag.locator(".tgi-rag-status")).to_contain_text(indexed)
    assert rag.locator(".tgi-rag-answer").inner_text().strip()  # the model's answer (random words: tiny model)
    page.screenshot(path=shots / "workbench_rag.png")


def test_parameters_fit_at_1280_px(page):
    """Every control of the Parameters tab whole at 1280 px: no label cut, no value behind a scrollbar; the
    JSON-schema box only for json_schema."""
    open_tab(page, "Parameters")
    params = page.locator(".tgi-workbench .tgi-parameters")
    expect(params.locator(".tgi-param-temperature")).to_be_visible()
    clipped = params.evaluate("""(root) => {
      const box = root.getBoundingClientRect();
      const out = [];
      for (const el of [root, ...root.querySelectorAll('*')]) {
        if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible'
            && !el.closest('.tgi-param-code')) out.push('scrolls: ' + el.className);
      }
      for (const label of root.querySelectorAll('.widget-label, .widget-readout')) {
        const r = label.getBoundingClientRect();
        if (r.width && (label.scrollWidth > label.clientWidth + 1 || r.right > box.right + 1 || r.left < box.left - 1))
          out.push('cut: ' + label.textContent);
      }
      return out;
    }""")
    assert clipped == [], clipped
    schema = params.locator(".widget-textarea", has_text="JSON schema")
    expect(schema).to_be_hidden()
    params.locator(".tgi-param-response-format select").select_option("json_schema")
    expect(schema).to_be_visible()
    params.locator(".tgi-param-response-format select").select_option("text")
    expect(schema).to_be_hidden()
    # The curl snippet names the endpoint's own URL (a free port), not 127.0.0.1:8080.
    url = page.locator(".tgi-workbench .tgi-endpoint-url").first.inner_text()
    expect(page.locator(".tgi-workbench .tgi-param-code")).to_contain_text(f"curl {url}/v1/chat/completions")


def test_reply_copy_button(page):
    open_tab(page, "Chat")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    reply = replies(page).last
    reply.locator(".tgi-chat-copy").click()
    expect(reply.locator(".tgi-chat-copy")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() and copied.split()[0] in reply.locator(".tgi-chat-body").inner_text()


def test_a_reload_while_an_answer_streams_leaves_a_working_chat(page, shots):
    """The sequence a person reported: Compare, Monitor and RAG used (the tests before this one ran them), the
    page reloaded while an answer streams, the answer ending after the reload. Send must still work (a
    background thread's update used to route the chat's buttons to a subshell the new page had deleted), and
    the transcript shows the whole conversation, the part streamed before the reload included, scrolled to
    the newest message."""
    set_max_tokens(page, 8)
    open_tab(page, "Compare")
    page.locator(".tgi-workbench .tgi-compare-run").click()
    expect(page.locator(".tgi-workbench .tgi-compare-export-csv")).to_be_visible()
    open_tab(page, "Monitor")
    expect(page.locator(".tgi-workbench .tgi-monitor-plots")).to_contain_text("output tokens/s")
    set_max_tokens(page, 1500)
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")  # the outputs a reload shows
    open_tab(page, "Chat")
    before = replies(page).count()
    send(page, "Tell me a very long story about a lighthouse keeper.", key="Enter")
    streaming = page.locator(".tgi-workbench .tgi-chat .tgi-chat-streaming .tgi-chat-body")
    page.wait_for_function("(el) => el.textContent.length > 40", arg=streaming.element_handle())
    streamed = streaming.inner_text()[:40]
    page.reload()
    page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
    open_tab(page, "Chat")
    transcript = page.locator(".tgi-workbench .tgi-chat .tgi-chat-transcript")
    expect(transcript).to_contain_text("lighthouse keeper")  # the prompt, from before the reload
    expect(transcript).to_contain_text(streamed)  # and what had streamed before it
    # The answer ends by itself after the reload, nothing clicked meanwhile: a click would make its subshell
    # the kernel's latest request again, hiding the bug.
    expect(replies(page)).to_have_count(before + 1)
    page.wait_for_function("(el) => el.scrollTop + el.clientHeight >= el.scrollHeight - 2",
                           arg=transcript.element_handle())
    page.screenshot(path=shots / "workbench_after_reload.png")
    set_max_tokens(page, 8)  # the long answer is in the history: leave room in the context
    open_tab(page, "Chat")
    send(page, "Hello again")  # the button, as reported
    expect(replies(page)).to_have_count(before + 2)
    expect(transcript).to_contain_text("Hello again")
    page.locator(".tgi-workbench .tgi-chat-clear").click()
    expect(replies(page)).to_have_count(0)


def test_the_chat_in_notebook_7(page, lab):
    """The same widgets in Notebook 7 (``jupyter notebook``'s page, served by the same server): a ChatWidget in
    another kernel, on the endpoint the workbench runs, answers a prompt sent with Enter."""
    base, token = lab
    url = page.locator(".tgi-workbench .tgi-endpoint-url").first.inner_text()
    notebook = {"cells": [{"cell_type": "code", "execution_count": None, "id": "chat", "metadata": {}, "outputs": [],
                           "source": ["from tgi_nb.widgets import ChatWidget\n",
                                      f"ChatWidget({url!r}, parameters={{'max_tokens': 8}})"]}],
                "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
                "nbformat": 4, "nbformat_minor": 5}
    response = httpx.put(f"{base}/api/contents/notebook7.ipynb", params={"token": token}, timeout=30,
                         json={"type": "notebook", "format": "json", "content": notebook})
    assert response.status_code in (200, 201), response.text
    nb7 = page.context.new_page()
    try:
        nb7.goto(f"{base}/notebooks/notebook7.ipynb?token={token}")
        nb7.locator(".jp-Notebook .jp-Cell .cm-content").first.click()
        nb7.keyboard.press("Shift+Enter")  # Notebook 7 runs the cell as JupyterLab does
        chat = nb7.locator(".tgi-chat")
        area = chat.locator(".tgi-chat-input textarea")
        area.fill("Hello from Notebook 7")
        area.press("Enter")
        expect(chat.locator(".tgi-chat-assistant:not(.tgi-chat-streaming) .tgi-chat-stats")).to_contain_text(
            re.compile(r"\b[1-8] tokens"))
    finally:
        nb7.close()


def test_migration_tab_replays_a_recorded_workload(page, shots, tmp_path):
    """The Migration tab: load a workload recorded with OpenAI's answers, replay it on the endpoint (greedy, and
    sampled at temperature 0.8), read the report and its charts, open one request side by side."""
    from tgi_nb.migrate import WorkItem, Workload

    recorded = [("What is the capital of France?", "The capital of France is Paris."),
                ("Name three primary colours.", "Red, yellow and blue."),
                ("What is 2 + 2?", "2 + 2 = 4.")]
    path = tmp_path / "workload.jsonl"
    Workload([WorkItem(f"request-{i}", "/v1/chat/completions",
                       {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}], "max_tokens": 16,
                        "temperature": 0},
                       {"object": "chat.completion", "model": "gpt-4o-mini", "choices": [
                           {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]},
                       200) for i, (question, answer) in enumerate(recorded, start=1)]).save(path)
    open_tab(page, "Migration")
    tab = page.locator(".tgi-workbench .tgi-migration")
    tab.locator(".tgi-migration-path input").fill(str(path))
    tab.locator(".tgi-migration-load").click()
    expect(tab.locator(".tgi-migration-workload")).to_contain_text("3 with a recorded answer")
    tab.locator(".tgi-migration-run").click()
    expect(tab.locator(".tgi-migration-status")).to_contain_text("6/6 done")
    expect(tab.locator(".tgi-migration-summary-box")).to_contain_text("Reference: the recorded answers")
    expect(tab.locator(".tgi-migration-plot svg")).to_have_count(3)
    tab.locator(".tgi-migration-request select").select_option("request-1")
    detail = tab.locator(".tgi-migration-detail")
    expect(detail).to_contain_text("The capital of France is Paris.")
    expect(detail.locator(".tgi-migration-answer")).to_have_count(3)   # the reference and both targets
    assert "migration_report.csv" in tab.locator(".tgi-migration-export").inner_text()
    page.set_viewport_size({"width": 1280, "height": 1300})  # the report, the charts and the request at once
    try:
        tab.locator(".tgi-migration-run").scroll_into_view_if_needed()
        page.screenshot(path=shots / "workbench_migration.png")
    finally:
        page.set_viewport_size({"width": 1280, "height": 1000})
