"""``RagWidget``: documents in, questions answered with their sources, on a :class:`~tgi_nb.rag.RagPipeline`.

Indexing and answering run in the widget's :class:`~tgi_nb.widgets.lifecycle.Worker`; handlers return at once
(a click waits for any running cell, so a blocking handler would freeze the page). Questions and answers go to
the chat's :class:`~tgi_nb.widgets.transcript.Transcript`: the answer streams append-only, coalesced as the
chat's, and is rendered as markdown once it ended.
"""

from __future__ import annotations

import html
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import ipywidgets as w

from tgi_nb.rag import RagPipeline, Source, load_file, load_paths
from tgi_nb.rag.citations import not_found_warning

from .controls import button, styled
from .lifecycle import Coalescer, Job, Worker, replace_in_cell
from .streaming import describe_error
from .transcript import Transcript


class RagWidget(w.VBox):
    """Add documents (upload, pasted text, a folder), ask questions, read the streamed answer beside the chunks
    it was given, with their source and score. k, chunk size and overlap are adjustable; changing the chunking
    re-indexes what was added. ``answer`` is the transcript of the questions and answers; ``idle`` is set
    whenever no indexing or answering runs; ``close()`` stops them (re-running the cell does it too).

    ``target_or_pipeline`` is a :class:`~tgi_nb.rag.RagPipeline`, or anything it accepts as target (an endpoint,
    an ``openai.OpenAI`` client, a base URL), with ``pipeline_kwargs`` passed on.

    Stable CSS classes: ``tgi-rag`` (the whole), ``tgi-rag-question``, ``tgi-rag-ask``, ``tgi-rag-stop``,
    ``tgi-rag-answer``, ``tgi-rag-sources``, ``tgi-rag-upload``, ``tgi-rag-text``, ``tgi-rag-add-text``,
    ``tgi-rag-folder``, ``tgi-rag-add-folder``, ``tgi-rag-progress``, ``tgi-rag-status``, ``tgi-rag-code``.

    Example:
        >>> from tgi_nb.widgets.rag import RagWidget
        >>> widget = RagWidget(endpoint)              # doctest: +SKIP
        >>> widget                                    # doctest: +SKIP
    """

    def __init__(self, target_or_pipeline: Any, **pipeline_kwargs: Any):
        if isinstance(target_or_pipeline, RagPipeline):
            self.pipeline = target_or_pipeline
        else:
            self.pipeline = RagPipeline(target_or_pipeline, **{"progress": False, **pipeline_kwargs})
        rag = self.pipeline
        self._lock = threading.Lock()
        self._busy: Optional[str] = None  # "indexing" or "asking" while the worker runs
        self._worker = Worker("rag")
        self.idle = self._worker.idle

        self.upload = styled(w.FileUpload(accept=",".join((".txt", ".md", ".html", ".htm", ".pdf")), multiple=True,
                                           description="Upload"), "tgi-rag-upload")
        self.text = styled(w.Textarea(placeholder="Paste text to add", layout=w.Layout(width="100%")),
                            "tgi-rag-text")
        self.add_text_button = button("Add text", "tgi-rag-add-text", self._add_text_clicked)
        self.folder = styled(w.Text(placeholder="a folder path, e.g. docs/"), "tgi-rag-folder")
        self.add_folder_button = button("Add folder", "tgi-rag-add-folder", self._add_folder_clicked)
        self.progress = styled(w.IntProgress(value=0, min=0, max=1, description="Indexed"), "tgi-rag-progress")
        self.status = styled(w.HTML(), "tgi-rag-status")

        self.k = w.IntSlider(value=rag.k, min=1, max=10, description="k")
        self.chunk_size = w.BoundedIntText(value=rag.chunk_size, min=50, max=8000, step=50, description="Chunk size")
        self.chunk_overlap = w.BoundedIntText(value=rag.chunk_overlap, min=0, max=4000, step=10,
                                              description="Overlap")
        self.reindex_button = button("Re-index", "tgi-rag-reindex", self.reindex)

        # It takes the row's free width; the buttons keep their labels' (width 100% squeezed them to "A...").
        self.question = styled(w.Text(placeholder="Ask a question about your documents",
                                       layout=w.Layout(flex="1 1 auto", width="auto")), "tgi-rag-question")
        self.question.on_submit(lambda _: self._ask_clicked())
        self.ask_button = button("Ask", "tgi-rag-ask", self._ask_clicked, style="primary")
        self.stop_button = button("Stop", "tgi-rag-stop", self.stop, style="danger")
        self.stop_button.disabled = True
        self.answer = styled(Transcript(), "tgi-rag-answer")
        self.sources = styled(w.HTML(), "tgi-rag-sources")
        self.code = styled(w.HTML(), "tgi-rag-code")

        self.upload.observe(self._uploaded, names="value")
        self.k.observe(self._k_changed, names="value")
        self.chunk_size.observe(self._chunking_changed, names="value")
        self.chunk_overlap.observe(self._chunking_changed, names="value")

        documents = w.VBox([w.HBox([self.upload]), self.text, self.add_text_button,
                            w.HBox([self.folder, self.add_folder_button]), self.progress, self.status])
        settings = w.VBox([self.k, self.chunk_size, self.chunk_overlap, self.reindex_button])
        answer = w.VBox([w.HBox([self.question, self.ask_button, self.stop_button]),
                         w.HBox([w.VBox([w.HTML("<b>Answer</b>"), self.answer], layout=w.Layout(width="55%")),
                                 w.VBox([w.HTML("<b>Retrieved chunks</b>"), self.sources],
                                        layout=w.Layout(width="45%"))]),
                         self.code])
        # Documents open: adding some is the first thing to do; Settings (k, chunking) stay folded.
        accordion = w.Accordion(children=[documents, settings], titles=("Documents", "Settings"), selected_index=0)
        super().__init__([accordion, answer])
        self.add_class("tgi-rag")
        self._show_status()
        self._show_code("")
        replace_in_cell(self)

    # -- documents -------------------------------------------------------------------------------------
    def add_texts(self, texts: list[str], metadatas: Optional[list[dict]] = None) -> bool:
        """Index texts in the background; False (and a status message) when busy.

        Example:
            >>> widget.add_texts(["Paris is the capital of France."], [{"source": "facts"}])   # doctest: +SKIP
            True
        """
        return self._start("indexing", lambda job: self.pipeline.add_texts(texts, metadatas,
                                                                            on_progress=self._on_progress))

    def add_paths(self, paths: list[str]) -> bool:
        """Index files and folders in the background; False (and a status message) when busy.

        Example:
            >>> widget.add_paths(["docs/", "notes.pdf"])                                       # doctest: +SKIP
            True
        """
        return self._start("indexing", lambda job: self.pipeline.add_documents(load_paths(paths),
                                                                                on_progress=self._on_progress))

    def reindex(self) -> bool:
        """Split everything again with the chunk size and overlap shown, in the background.

        Example:
            >>> widget.chunk_size.value = 400     # re-indexes by itself; reindex() does it on demand  # doctest: +SKIP
        """
        size, overlap = self.chunk_size.value, self.chunk_overlap.value
        if overlap >= size:
            self._say(f"chunk_overlap must be smaller than the chunk size ({size}); not re-indexed", error=True)
            return False
        return self._start("indexing",
                           lambda job: self.pipeline.reindex(size, overlap, on_progress=self._on_progress))

    def _add_text_clicked(self) -> None:
        text = self.text.value.strip()
        if text and self.add_texts([text], [{"source": f"pasted text {len(self.pipeline.documents) + 1}"}]):
            self.text.value = ""

    def _add_folder_clicked(self) -> None:
        folder = self.folder.value.strip()
        if not folder or not Path(folder).expanduser().is_dir():
            self._say(f"not a folder: {html.escape(folder)!s}", error=True)
            return
        self.add_paths([str(Path(folder).expanduser())])

    def _uploaded(self, change: dict) -> None:
        files = list(change["new"] or ())
        if not files:
            return

        def index(job: Job) -> int:
            docs = []
            with tempfile.TemporaryDirectory() as tmp:
                for item in files:
                    path = Path(tmp) / Path(item["name"]).name
                    path.write_bytes(bytes(item["content"]))
                    for doc in load_file(path):  # the suffix chooses the reader; PDFs need the file
                        doc.metadata["source"] = item["name"]
                        docs.append(doc)
            return self.pipeline.add_documents(docs, on_progress=self._on_progress)

        self._start("indexing", index)

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _chunking_changed(self, _change: dict) -> None:
        if self.pipeline.documents:
            self.reindex()

    def _k_changed(self, change: dict) -> None:
        self.pipeline.k = change["new"]
        self._show_code(self.question.value)

    # -- asking ----------------------------------------------------------------------------------------
    def ask(self, question: Optional[str] = None) -> bool:
        """Answer ``question`` (default: the question box) in the background; False when busy or empty.

        Example:
            >>> widget.ask("What does make test run?")                                         # doctest: +SKIP
            True
            >>> widget.idle.wait(60)                                                           # doctest: +SKIP
            True
        """
        question = (self.question.value if question is None else question).strip()
        if not question:
            self._say("type a question first", error=True)
            return False
        self._show_code(question)
        return self._start("asking", lambda job: self._answer(job, question))

    def _ask_clicked(self) -> None:
        self.ask()

    def _answer(self, job: Job, question: str) -> None:
        self.sources.value = ""
        self.answer.add("user", question)
        self.answer.start_reply()
        stream = self.pipeline.ask(question, stream=True)
        forget = job.on_stop(stream.close)  # Stop: the HTTP stream closes, the server stops generating
        warning = not_found_warning(stream.sources)
        try:
            self.sources.value = (f"<div class='tgi-rag-not-found' style='color:#b45309'>&#9888; {html.escape(warning)}"
                                  "</div>" if warning else "") + _sources_html(stream.sources)
            shown = Coalescer(self.answer.append)
            for piece in stream:
                shown.add(piece)
            shown.flush()
        finally:
            forget()
        stopped = job.stopping.is_set()
        # Ended: the answer with the [n] markers the model left out (citations.cite); stopped: as far as it came.
        self.answer.end_reply(shown.text if stopped else stream.answer.text, stats="stopped" if stopped else None,
                              notice=warning)

    def stop(self) -> None:
        """Stop the answer being streamed (the server stops generating).

        Example:
            >>> widget.stop()                                                                  # doctest: +SKIP
        """
        self._worker.stop()

    def close(self) -> None:
        """Stop what runs (an answer streaming stops at once) and close the widget."""
        if hasattr(self, "_worker"):  # not when __init__ failed (ipywidgets closes in __del__)
            self._worker.close()
        super().close()

    # -- background work -------------------------------------------------------------------------------
    def _start(self, kind: str, work: Callable[[Job], Any]) -> bool:
        with self._lock:
            if self._worker.busy:
                self._say(f"busy {self._busy}; wait for it to finish", error=True)
                return False
            self._busy = kind
            self.ask_button.disabled = True
            self.stop_button.disabled = kind != "asking"
            self._say("indexing..." if kind == "indexing" else "answering...")
            return self._worker.start(work, on_end=lambda error: self._ended(kind, error)) is not None

    def _ended(self, kind: str, error: Optional[BaseException]) -> None:
        # In the worker's thread, before ``idle`` is set: the status and buttons are right once it is.
        if error is not None:
            message = describe_error(error, self.pipeline.base_url)[1]
            if kind == "asking":
                self.answer.end_reply(message, role="error")
            self._say(html.escape(message), error=True)
        else:
            self._show_status()
        with self._lock:
            self._busy = None
        self.ask_button.disabled = False
        self.stop_button.disabled = True

    def _say(self, message: str, error: bool = False) -> None:
        color = "var(--jp-error-color1, #c00)" if error else "inherit"
        self.status.value = f'<span style="color: {color}">{message}</span>'

    def _show_status(self) -> None:
        count = len(self.pipeline)
        self._say(f"{count} chunk{'' if count == 1 else 's'} indexed")

    def _show_code(self, question: str) -> None:
        rag = self.pipeline
        self.code.value = (
            "<details><summary>Code</summary><pre>"
            + html.escape(f"from tgi_nb.rag import RagPipeline\n\n"
                          f"rag = RagPipeline(endpoint, k={rag.k}, chunk_size={rag.chunk_size}, "
                          f"chunk_overlap={rag.chunk_overlap})\n"
                          f"rag.add_files([...])\n"
                          f"for piece in rag.ask({question!r}, stream=True):\n"
                          f"    print(piece, end=\"\")")
            + "</pre></details>")


def _sources_html(sources: list[Source]) -> str:
    rows = "".join(
        f'<li class="tgi-rag-source"><b>[{s.number}]</b> {html.escape(s.document)} '
        f'<span class="tgi-rag-score">score {s.score:.2f}</span>'
        f'<div style="white-space: pre-wrap; font-size: 90%">{html.escape(s.chunk)}</div></li>'
        for s in sources)
    return f'<ol style="list-style: none; padding-left: 0">{rows}</ol>'
