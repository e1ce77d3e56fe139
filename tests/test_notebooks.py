"""The migration notebooks, executed top to bottom in a real kernel (nbclient) with the bundled SmolLM2, offline.

The kernel runs this interpreter (the repository's .venv) from a kernel spec written to a temporary folder (see
test_endpoints_kernel.kernel_manager), with HF_HUB_OFFLINE=1 and no HF_TOKEN: the notebooks must not prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_endpoints_kernel import kernel_manager

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600  # seconds: the first run converts the bundled model (about 30 s); generation is on the CPU


def execute(name: str, spec_root: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(spec_root), timeout=CELL_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> str:
    """Everything the cells printed or displayed, as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out:
                parts.append(out["data"].get("text/plain", ""))
    return "\n".join(parts)


def cell_output(nb: nbformat.NotebookNode, snippet: str) -> str:
    """What the one code cell whose source contains ``snippet`` printed."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and snippet in c.source)
    return "".join(out["text"] for out in cell.get("outputs", []) if out.get("output_type") == "stream")


# A progress bar's frame short of its end: "Loading weights:   0%|", "Indexing:  42%|", "...: pending [00:00]".
UNFINISHED_PROGRESS = re.compile(r"(?<!\d)\d{1,2}%\||: (pending|initializing) \[")


def unfinished_progress(nb: nbformat.NotebookNode) -> list[str]:
    """The saved outputs that still show a progress bar mid-way: a bar's widget keeps its first frame as the
    output's text (what GitHub, nbviewer and nbconvert show) unless the bar replaces it when it ends."""
    return [text for cell in nb.cells for out in cell.get("outputs", [])
            for text in [out.get("text", "") + out.get("data", {}).get("text/plain", "")]
            if UNFINISHED_PROGRESS.search(text)]


def ended_by_itself(answer: str) -> bool:
    """An answer that ends a sentence (citation markers may follow), not one cut at max_tokens mid-way."""
    answer = answer.strip()
    return answer.endswith((".", "!", "?")) or re.sub(r"(\s*\[\d+\])+$", "", answer).endswith((".", "!", "?"))


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_01_create_endpoint(tmp_path, no_token, smollm2_dir):
    nb = execute("01_create_endpoint.ipynb", tmp_path)
    text = outputs(nb)
    assert "running" in text and "paused" in text and "scaledToZero" in text and "deleted" in text
    assert "MAX_TOTAL_TOKENS=32000" in text  # the cookbook's limits, lowered with a visible warning
    assert "Paris" in text                   # a real answer from the real model
    # Each warning once, pointing at the notebook's cell rather than the kernel's threading.py
    lowered = next(line for line in text.splitlines() if "MAX_TOTAL_TOKENS=32000" in line)
    assert text.count(lowered.split("MAX_TOTAL_TOKENS=32000", 1)[1][:40]) == 1, text
    assert "threading.py" not in text
    assert "taken only as requests fill it" in text  # the KV cache's size as a ceiling, not memory taken
    # wait()'s bar ends as its last line, not as its first frame ("pending [00:00]") left in the file
    assert "Inference Endpoint smollm2-135m-demo: running [" in text
    assert not unfinished_progress(nb), unfinished_progress(nb)


def test_02_openai_client(tmp_path, no_token, smollm2_dir):
    nb = execute("02_openai_client.ipynb", tmp_path)
    text = outputs(nb)
    assert "Paris" in text
    assert "401:" in text and "400: context_length_exceeded" in text
    seeded = [line for line in text.splitlines() if line.startswith("seed 1")]
    assert len(seeded) == 2 and seeded[0].split(":", 1)[1].strip() == seeded[1].split(":", 1)[1].strip()
    assert "'length')" in text and "'stop')" in text
    assert not unfinished_progress(nb), unfinished_progress(nb)


def test_00_workbench(tmp_path, no_token):
    nb = execute("00_workbench.ipynb", tmp_path)
    views = [out for cell in nb.cells for out in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert len(views) == 1  # the workbench; driving it is tests/test_widgets_browser.py's job


def test_03_langchain_llamaindex(tmp_path, no_token, smollm2_dir):
    nb = execute("03_langchain_llamaindex.ipynb", tmp_path)
    text = outputs(nb)
    assert "Paris" in text
    assert "'name': 'get_weather'" in text and "'city':" in text     # bind_tools: a parsed tool call
    assert "<tool_response>" not in text and "sunny" in text          # the answer to its result, in words
    assert "City(name=" in text                                       # with_structured_output: a parsed model
    assert "dimensions: 384" in text
    ranking = text.split("dimensions: 384", 1)[1].splitlines()
    assert "Eiffel Tower" in ranking[1]                               # the closest document comes first
    assert "sentence-transformers/all-MiniLM-L6-v2" in text           # the model that embedded
    assert "deleted" in text
    assert not unfinished_progress(nb), unfinished_progress(nb)


def test_04_rag(tmp_path, no_token, smollm2_dir):
    nb = execute("04_rag.ipynb", tmp_path)
    text = outputs(nb)
    assert "serving.md" in text                                       # the cookbook chain's retrieved sources
    assert "chunks indexed" in text and "Sources:\n[1] " in text      # RagPipeline: numbered sources
    assert "questions: 18" in text
    rates = dict(part.split() for part in text.split("retrieval hit rate: ", 1)[1].splitlines()[0].split(", "))
    assert float(rates["@4"]) >= 0.8                                  # MiniLM finds the right page
    assert "answer contains the fact: " in text
    assert "cited: ['[" in text                                       # [n] markers, added where left out
    assert "Loading weights" not in text                              # no progress bar frames left behind
    assert "Indexing: 100%" in text and not unfinished_progress(nb), unfinished_progress(nb)
    # Each shown answer ends by itself, or runs long (a 135M model may loop): none cut at a small max_tokens
    answers = [cell_output(nb, "rag_chain_with_source.invoke").rsplit("\n['", 1)[0],
               cell_output(nb, "query_engine.query(").split("\n0.", 1)[0],
               cell_output(nb, 'rag.ask("What happens').split("chunks indexed\n", 1)[1].split("\n\nSources:", 1)[0],
               cell_output(nb, "stream=True").split("\n", 1)[1].split("\ncited:", 1)[0]]
    assert all(answer.strip() for answer in answers), answers
    assert all(ended_by_itself(answer) or len(answer.split()) >= 80 for answer in answers), answers
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert "deleted" in text


def test_05_responses_api(tmp_path, no_token, smollm2_dir):
    nb = execute("05_responses_api.ipynb", tmp_path)
    text = outputs(nb)
    assert text.count("Paris") >= 3                                   # both APIs, and the streamed one
    assert "'response.completed': 1" in text and "completed True" in text
    assert "function_call get_weather" in text                        # the tool round trip
    assert "name=" in text and "country=" in text                     # the parsed structured output
    assert "reasoning:" in text and "reasoning tokens:" in text       # a reasoning item, and its tokens
    assert "thinking: " in text and "400: tools.0.type" in text
    assert not unfinished_progress(nb), unfinished_progress(nb)


def test_06_migration_check(tmp_path, no_token, smollm2_dir, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # offline: recorded against the bundled model
    nb = execute("06_migration_check.ipynb", tmp_path)
    text = outputs(nb)
    assert "triage: {'category':" in text and "tool call: lookup_order" in text and "embeddings: 3 x 384" in text
    assert "8 requests recorded: /v1/chat/completions, /v1/embeddings" in text
    assert "24/24 requests replayed" in text
    markdown = [out["data"]["text/markdown"] for cell in nb.cells for out in cell.get("outputs", [])
                if "text/markdown" in out.get("data", {})]
    assert markdown and "reference: the recorded answers" in markdown[0]       # the report, rendered
    # The endpoint that recorded replays its greedy answers exactly.
    assert "smollm2-migration: exact match 7/7, similarity 1.0" in text
    assert any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert "migration_report.csv" in text and "migration_report.md" in text
    views = [out for cell in nb.cells for out in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert views  # the MigrationWidget (driving it is tests/test_widgets_browser.py's job)
    assert "completed BatchRequestCounts(completed=7, failed=0, total=7)" in text
    assert "deleted deleted" in text
    assert not unfinished_progress(nb), unfinished_progress(nb)
