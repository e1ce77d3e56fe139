"""The README's screenshots of the workbench, taken from the real thing: JupyterLab in Chromium at 1280 px, the
bundled SmolLM2-135M-Instruct answering real questions (never a random-weight model).

    .venv/bin/python docs/screenshots.py            # writes docs/workbench_*.png (about 5 minutes on a laptop)

Needs Debian's chromium and playwright (as tests/test_widgets_browser.py). Writes:
workbench_endpoint.png (the form and the running endpoint), workbench_chat.png (a streamed answer with code and
its stats), workbench_compare.png (one prompt at three temperatures), workbench_monitor.png (the monitor while
eight requests run), workbench_rag.png (an answer with its sources), workbench_migration.png (a workload recorded
with OpenAI's answers replayed on the endpoint, greedy and sampled).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the browser tests' JupyterLab, shared

from jupyter_lab import CHROMIUM, KERNEL_IDLE, running_lab  # noqa: E402

TIMEOUT_MS = 600_000
NOTEBOOK = {"cells": [{"cell_type": "code", "execution_count": None, "id": "workbench", "metadata": {},
                       "outputs": [], "source": ["import tgi_nb\n", "\n", "bench = tgi_nb.workbench()\n", "bench"]}],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5}
# Three short documents for the RAG tab: a 135M model answers from a passage it can quote, not from one it must
# reason over (asked about tgi_nb's own README it invents names).
RAG_DOCUMENTS = (
    "The Eiffel Tower is a wrought-iron tower in Paris, France. It was designed by Gustave Eiffel's company and "
    "completed in 1889 for the World's Fair. It is 330 metres tall.",
    "Mount Everest is the highest mountain on Earth, 8,849 metres above sea level. It lies in the Himalayas, on the "
    "border between Nepal and China. It was first climbed in 1953 by Edmund Hillary and Tenzing Norgay.",
    "The Great Wall of China is a series of fortifications built across northern China over many centuries. Its "
    "best-known parts were built during the Ming dynasty, between 1368 and 1644.")
def load(url: str, stop: threading.Event, prompts: int = 8) -> None:
    """Keep ``prompts`` requests running against the endpoint until ``stop``: the monitor's load."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1/", api_key="-", max_retries=0)

    def one(i: int) -> None:
        while not stop.is_set():
            client.chat.completions.create(model="tgi", max_tokens=120, messages=[
                {"role": "user", "content": f"Write a short poem about the number {i}."}])

    for i in range(prompts):
        threading.Thread(target=one, args=(i,), daemon=True).start()


# Questions and the answers OpenAI's gpt-4o-mini gave them (recorded once, as `tgi_nb.migrate.record` keeps them).
RECORDED = [("What is the capital of France?", "The capital of France is Paris."),
            ("Name three primary colours.", "The three primary colours are red, yellow and blue."),
            ("What is 12 times 12?", "12 times 12 is 144."),
            ("Translate 'good morning' into French.", "\"Good morning\" in French is \"Bonjour\"."),
            ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun.")]


def write_workload(path: Path) -> None:
    from tgi_nb.migrate import WorkItem, Workload

    Workload([WorkItem(f"request-{i}", "/v1/chat/completions",
                       {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}], "max_tokens": 48,
                        "temperature": 0},
                       {"object": "chat.completion", "model": "gpt-4o-mini", "choices": [
                           {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]},
                       200) for i, (question, answer) in enumerate(RECORDED, start=1)]).save(path)


def take(out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    def tab(title: str) -> None:
        page.locator(".tgi-workbench > .lm-TabBar .lm-TabBar-tab", has_text=title).click()

    def shot(name: str) -> None:
        page.locator(".tgi-workbench").screenshot(path=out / name)
        print("wrote", out / name, flush=True)

    root = Path(tempfile.mkdtemp(prefix="tgi_nb-screens-"))
    (root / "workbench.ipynb").write_text(json.dumps(NOTEBOOK))
    stop = threading.Event()
    try:
        with running_lab(root) as (base, token), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            context.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page = context.new_page()
            page.goto(f"{base}/lab/tree/workbench.ipynb?token={token}")
            page.wait_for_function(KERNEL_IDLE, timeout=TIMEOUT_MS)
            page.evaluate("window.jupyterapp.commands.execute('application:toggle-left-area')")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            form = page.locator(".tgi-workbench .tgi-endpoint")
            form.locator(".tgi-endpoint-create").click()  # the form's defaults: the bundled SmolLM2
            expect(form.locator(".tgi-endpoint-badge")).to_have_attribute("data-status", "running")
            expect(page.locator(".tgi-workbench .tgi-workbench-next")).to_be_visible()
            shot("workbench_endpoint.png")
            url = form.locator(".tgi-endpoint-url").inner_text()

            tab("Chat")
            chat = page.locator(".tgi-workbench .tgi-chat")
            area = chat.locator(".tgi-chat-input textarea")
            replies = chat.locator(".tgi-chat-assistant:not(.tgi-chat-streaming)")
            for i, question in enumerate(("What is the capital of France? Answer in one word.",
                                          "Write a Python function that returns the square of a number.")):
                area.fill(question)
                area.press("Enter")
                expect(replies).to_have_count(i + 1)
            shot("workbench_chat.png")

            tab("Compare")
            compare = page.locator(".tgi-workbench .tgi-compare")
            compare.locator(".tgi-compare-prompts textarea").fill("Name three colours of the rainbow.")
            compare.locator(".tgi-compare-run").click()
            expect(compare.locator(".tgi-compare-export-csv")).to_be_visible()
            shot("workbench_compare.png")

            tab("Monitor")
            load(url, stop)
            page.wait_for_function("() => /running <b>?[1-9]/.test(document.querySelector("
                                   "'.tgi-workbench .tgi-monitor-plots').innerHTML)")
            time.sleep(20)  # twenty seconds of load on the charts (a screenshot script, not a test)
            shot("workbench_monitor.png")
            stop.set()

            tab("RAG")
            rag = page.locator(".tgi-workbench .tgi-rag")
            for n, paragraph in enumerate(RAG_DOCUMENTS, start=1):
                rag.locator(".tgi-rag-text textarea").fill(paragraph)
                rag.locator(".tgi-rag-add-text").click()
                expect(rag.locator(".tgi-rag-status")).to_contain_text(f"{n} chunk")
            rag.locator(".tgi-rag-question input").fill("When were the best-known parts of the Great Wall built?")
            rag.locator(".tgi-rag-ask").click()
            expect(rag.locator(".tgi-rag-answer .tgi-chat-assistant:not(.tgi-chat-streaming)")).to_have_count(1)
            page.set_viewport_size({"width": 1280, "height": 1300})  # the documents, the answer and its sources
            shot("workbench_rag.png")

            tab("Migration")
            workload = root / "workload.jsonl"
            write_workload(workload)
            migration = page.locator(".tgi-workbench .tgi-migration")
            migration.locator(".tgi-migration-path input").fill(str(workload))
            migration.locator(".tgi-migration-load").click()
            expect(migration.locator(".tgi-migration-workload")).to_contain_text("with a recorded answer")
            migration.locator(".tgi-migration-run").click()
            expect(migration.locator(".tgi-migration-status")).to_contain_text(f"{2 * len(RECORDED)}/"
                                                                             f"{2 * len(RECORDED)} done")
            migration.locator(".tgi-migration-request select").select_option("request-1")
            expect(migration.locator(".tgi-migration-detail .tgi-migration-answer")).to_have_count(3)
            page.set_viewport_size({"width": 1280, "height": 1450})  # the report, the charts and the request
            shot("workbench_migration.png")
            context.close()
            browser.close()
    finally:
        stop.set()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default: docs/)")
    take(parser.parse_args().out)


if __name__ == "__main__":
    main()
