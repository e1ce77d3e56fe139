"""RagWidget at the Python level, on a real server (tiny random llama, the bundled all-MiniLM-L6-v2): adding
documents by paste, upload and folder; asking with a streamed answer and its sources; Stop; k and re-chunking.
Each action runs in a background thread; tests wait on the widget's ``idle`` event, never on a sleep.
"""

from __future__ import annotations

import datetime

import pytest

from server_fixtures import running_server, wait_until
from server_fixtures import engine  # noqa: F401  (module-scoped fixtures)
from tgi_nb.rag import RagPipeline, local_embeddings
from tgi_nb.widgets.rag import RagWidget

ETNA = "Mount Etna, on the island of Sicily, is the most active volcano in Europe."
TIMEOUT = 180  # seconds: generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as (server, _):
        yield server


@pytest.fixture(scope="module")
def embeddings():
    return local_embeddings()


def make_widget(server, embeddings, **kwargs) -> RagWidget:
    kwargs.setdefault("max_tokens", 8)
    return RagWidget(RagPipeline(server.url, embeddings=embeddings, progress=False, **kwargs))


def settle(widget: RagWidget) -> None:
    assert widget.idle.wait(TIMEOUT), "the widget's background work did not finish"


def test_css_classes(server, embeddings):
    widget = make_widget(server, embeddings)
    assert "tgi-rag" in widget._dom_classes
    for part, css in ((widget.question, "tgi-rag-question"), (widget.ask_button, "tgi-rag-ask"),
                      (widget.answer, "tgi-rag-answer"), (widget.sources, "tgi-rag-sources"),
                      (widget.stop_button, "tgi-rag-stop"), (widget.upload, "tgi-rag-upload")):
        assert css in part._dom_classes


def test_paste_upload_folder_then_ask(server, embeddings, tmp_path):
    widget = make_widget(server, embeddings, k=2)
    widget.text.value = ETNA
    widget.add_text_button.click()
    settle(widget)
    assert widget.text.value == "" and len(widget.pipeline) == 1
    assert "1 chunk indexed" in widget.status.value and widget.progress.value == widget.progress.max == 1

    widget.upload.value = ({"name": "bees.md", "type": "text/markdown", "size": 40,
                            "content": memoryview(b"Honey bees communicate with a waggle dance."),
                            "last_modified": datetime.datetime.now()},)
    settle(widget)
    (tmp_path / "plants.txt").write_text("Photosynthesis takes place in the chloroplasts of leaf cells.")
    widget.folder.value = str(tmp_path)
    widget.add_folder_button.click()
    settle(widget)
    assert len(widget.pipeline) == 3

    widget.question.value = "How do bees talk to each other?"
    widget.ask_button.click()
    settle(widget)
    assert widget.answer.last_text and "error" not in widget.status.value
    assert widget.sources.value.index("bees.md") < widget.sources.value.index("score")  # best source first
    assert widget.sources.value.count('class="tgi-rag-source"') == 2                      # k=2
    assert "How do bees talk to each other?" in widget.code.value
    assert not widget.ask_button.disabled and widget.stop_button.disabled
    assert "tgi-rag-not-found" not in widget.sources.value and "notice" not in widget.answer.entries[-1]
    # A question the documents do not answer: flagged beside the sources and under the answer.
    widget.ask("Who won the 2018 football world cup?")
    settle(widget)
    assert "Not found in your documents" in widget.sources.value
    assert widget.answer.entries[-1]["notice"].startswith("Not found in your documents: the closest passage scores")


def test_stop_ends_a_long_answer(server, embeddings, engine):
    # The tiny random model rarely stops on its own: without Stop it would write all 300 tokens (the prompt and
    # 300 fit the tests' 512-token context).
    widget = make_widget(server, embeddings, max_tokens=300)
    widget.add_texts([ETNA])
    settle(widget)
    assert widget.ask("Which volcano is the most active?")
    assert wait_until(lambda: widget.answer.last_text != "" or widget.idle.is_set(), timeout=TIMEOUT)
    widget.stop_button.click()
    settle(widget)
    text = widget.answer.last_text
    assert text, widget.status.value
    assert len(engine.tokenizer(text, add_special_tokens=False)["input_ids"]) < 200


def test_k_and_rechunking(server, embeddings):
    widget = make_widget(server, embeddings, chunk_size=800, chunk_overlap=100)
    widget.add_texts([" ".join(f"Sentence {i} is about topic number {i}." for i in range(60))])
    settle(widget)
    before = len(widget.pipeline)
    widget.chunk_size.value = 200          # changing the chunking re-indexes what was added
    settle(widget)
    assert len(widget.pipeline) > before and widget.pipeline.chunk_size == 200
    widget.k.value = 3
    assert widget.pipeline.k == 3 and "k=3" in widget.code.value
    widget.chunk_overlap.value = 300       # not below the chunk size: refused with a message, nothing re-indexed
    assert "must be smaller than the chunk size" in widget.status.value and widget.pipeline.chunk_overlap == 100
    assert widget.ask("   ") is False and "type a question first" in widget.status.value
