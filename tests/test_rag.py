"""tgi_nb.rag against a real server (tiny random llama for generation, the bundled all-MiniLM-L6-v2 for
embeddings), with every connection outside this machine refused: loaders, indexing, retrieval with scores,
answers with numbered sources, streaming, the LangChain runnable, persistence and re-indexing.
"""

from __future__ import annotations

import socket
from pathlib import Path

import openai
import pytest
from langchain_core.runnables import Runnable, RunnableLambda

from server_fixtures import running_server
from server_fixtures import engine  # noqa: F401  (module-scoped fixtures)
from tgi_nb.rag import (Answer, AnswerStream, RagPipeline, UnsupportedFileError, html_to_text, load_file,
                        load_folder, local_embeddings)

FACTS = {
    "eiffel.md": "# The Eiffel Tower\n\nThe Eiffel Tower in Paris was finished in 1889 for the World's Fair. "
                 "It is 330 metres tall and was designed by Gustave Eiffel's engineering company.",
    "photosynthesis.txt": "Photosynthesis is how plants turn sunlight, water and carbon dioxide into glucose and "
                          "oxygen. It takes place in the chloroplasts of leaf cells.",
    "volcano.html": "<html><head><title>x</title><script>var a=1;</script></head><body><h1>Volcanoes</h1>"
                    "<p>Mount Etna, on the island of Sicily, is the most active volcano in Europe.</p></body></html>",
}

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", None, ""}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse every connection that leaves this machine: a download attempt (chromadb's ONNX model, tiktoken's
    BPE files, the Hub) fails the test instead of passing on a machine that happens to be online."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in _LOCAL_HOSTS and not str(host).startswith("127."):
            raise OSError(f"test_rag: network access to {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in _LOCAL_HOSTS \
                and not str(host).startswith("127."):
            raise OSError(f"test_rag: network access to {address!r} refused")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as (server, _):
        yield server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    (folder / "notes.bin").write_bytes(b"\x00\x01")  # not a document: skipped in folders
    (folder / "sub").mkdir()
    (folder / "sub" / "bees.pdf").write_bytes(minimal_pdf("Honey bees communicate with a waggle dance."))
    return folder


@pytest.fixture(scope="module")
def embeddings():
    return local_embeddings()  # one model load for the module


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pipeline(server, embeddings, **kwargs) -> RagPipeline:
    kwargs.setdefault("max_tokens", 8)
    return RagPipeline(server.url, embeddings=embeddings, progress=False, **kwargs)


# -- loaders -----------------------------------------------------------------------------------------

def test_loaders_read_text_markdown_html_and_pdf(corpus):
    html_doc = load_file(corpus / "volcano.html")[0]
    assert html_doc.page_content == "Volcanoes\nMount Etna, on the island of Sicily, is the most active volcano " \
                                    "in Europe."
    pdf = load_file(corpus / "sub" / "bees.pdf")
    assert [d.metadata["page"] for d in pdf] == [1]
    assert "waggle dance" in pdf[0].page_content
    names = sorted(Path(d.metadata["source"]).name for d in load_folder(corpus))
    assert names == ["bees.pdf", "eiffel.md", "photosynthesis.txt", "volcano.html"]
    with pytest.raises(UnsupportedFileError, match=r"\.txt, \.md"):
        load_file(corpus / "notes.bin")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_file(corpus / "missing.txt")
    assert html_to_text("<p>a</p><style>p{}</style><p>b &amp; c</p>") == "a\nb & c"


# -- indexing and retrieval --------------------------------------------------------------------------

def test_add_files_retrieve_with_scores_and_progress(server, embeddings, corpus):
    rag = pipeline(server, embeddings, k=3)
    progress = []
    assert rag.add_files(corpus, on_progress=lambda done, total: progress.append((done, total))) == 4
    assert progress[-1] == (4, 4) and len(rag) == 4
    sources = rag.retrieve("Which volcano in Europe is the most active?")
    assert [s.number for s in sources] == [1, 2, 3]
    assert Path(sources[0].document).name == "volcano.html" and "Etna" in sources[0].chunk
    scores = [s.score for s in sources]
    assert scores == sorted(scores, reverse=True) and 0.3 < scores[0] <= 1.0
    assert Path(rag.retrieve("How do bees talk to each other?", k=1)[0].document).name == "bees.pdf"
    assert rag.add_files(corpus / "eiffel.md") == 1 and len(rag) == 4  # same chunks again: stored once


def test_add_texts_and_reindex(server, embeddings):
    rag = pipeline(server, embeddings, chunk_size=200, chunk_overlap=20)
    long_text = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(40))
    stored = rag.add_texts([long_text, FACTS["eiffel.md"]], [{"source": "long"}, {"source": "eiffel"}])
    assert stored == len(rag) > 2
    assert rag.reindex(chunk_size=600, chunk_overlap=50) < stored
    assert rag.chunk_size == 600 and len(rag) == rag.reindex()
    assert rag.retrieve("When was the Eiffel Tower finished?", k=1)[0].document == "eiffel"
    rag.clear()
    assert len(rag) == 0


def test_persisted_store_is_found_again(server, embeddings, tmp_path):
    first = pipeline(server, embeddings, persist_directory=tmp_path / "store")
    first.add_texts([FACTS["photosynthesis.txt"]], [{"source": "plants"}])
    again = pipeline(server, embeddings, persist_directory=tmp_path / "store")
    assert len(again) == 1
    assert again.retrieve("Where does photosynthesis happen?", k=1)[0].document == "plants"


def test_server_embeddings_rank_as_local_ones(server, embeddings, corpus):
    local = pipeline(server, embeddings)
    remote = pipeline(server, "server")
    for rag in (local, remote):
        rag.add_files(corpus)
    question = "What is the height of the tower in Paris?"
    a, b = local.retrieve(question), remote.retrieve(question)
    assert [s.chunk for s in a] == [s.chunk for s in b]
    assert [s.score for s in a] == pytest.approx([s.score for s in b], abs=1e-4)


# -- answers -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rag(server, embeddings, corpus):
    rag = pipeline(server, embeddings, k=2)
    rag.add_files(corpus)
    return rag


def test_ask_returns_the_answer_and_numbered_sources(rag):
    answer = rag.ask("Who designed the Eiffel Tower?")
    assert isinstance(answer, Answer) and answer.text
    assert [s.number for s in answer.sources] == [1, 2]
    assert Path(answer.sources[0].document).name == "eiffel.md"
    assert str(answer).startswith(answer.text) and "Sources:\n[1] " in str(answer)


def test_streamed_answer_equals_the_whole_one(rag):
    question = "Who designed the Eiffel Tower?"
    whole = rag.ask(question)
    stream = rag.ask(question, stream=True)
    assert isinstance(stream, AnswerStream)
    assert [s.chunk for s in stream.sources] == [s.chunk for s in whole.sources]  # known before any text
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == whole.text  # greedy: the same tokens
    assert stream.answer.text == whole.text


def test_stream_can_stop_early(rag, server):
    stream = rag.ask("Where is Mount Etna?", stream=True)
    next(iter(stream))
    stream.close()
    assert list(stream) == []
    # The server is free again: a new request is answered.
    assert openai.OpenAI(base_url=server.url + "/v1", api_key="-").chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=1).choices[0].message.content


def test_runnable_composes(rag):
    assert isinstance(rag.runnable, Runnable)
    out = rag.runnable.invoke("What happens in chloroplasts?")
    assert set(out) == {"context", "question", "answer"}
    assert out["context"][0].metadata["citation"] == 1 and "score" in out["context"][0].metadata
    shout = rag.runnable | RunnableLambda(lambda result: result["answer"].upper())
    assert shout.invoke("What happens in chloroplasts?") == out["answer"].upper()


def test_targets_and_bad_arguments(server, embeddings):
    client = openai.OpenAI(base_url=server.url + "/v1/", api_key="key")
    rag = RagPipeline(client, embeddings=embeddings, progress=False)
    assert rag.base_url == server.url + "/v1" and rag.api_key == "key"
    with pytest.raises(ValueError, match=r"chunk_overlap: must be an integer in \[0, chunk_size=100\)"):
        RagPipeline(server.url, embeddings=embeddings, chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValueError, match="k: must be an integer >= 1"):
        RagPipeline(server.url, embeddings=embeddings, k=0)
    with pytest.raises(ValueError, match="embeddings: must be 'local', 'server' or a LangChain Embeddings"):
        RagPipeline(server.url, embeddings="openai")
    with pytest.raises(TypeError, match="target: expected an InferenceEndpoint"):
        RagPipeline(42, embeddings=embeddings)
    with pytest.raises(ValueError, match="question: must be a non-empty string"):
        rag.ask("  ")


def test_chromadb_never_fetched_its_default_model():
    # chromadb's default embedding function downloads an ONNX model here on first use.
    assert not (Path.home() / ".cache" / "chroma" / "onnx_models").exists()


_COOKBOOK_CHROMA = """
from langchain_chroma import Chroma
from langchain_core.documents import Document
from tgi_nb.rag import local_embeddings
splits = [Document(page_content="Mount Etna is in Sicily.")]
store = Chroma.from_documents(documents=splits, embedding=local_embeddings(){settings})
assert store.similarity_search("Etna", k=1)[0].page_content == "Mount Etna is in Sicily."
"""
_TGI_NB_RAG = """
from tgi_nb.rag import RagPipeline
rag = RagPipeline("http://127.0.0.1:9/v1", progress=False)
assert rag.add_texts(["The Eiffel Tower is 330 metres tall."]) == 1
assert rag.vectorstore.similarity_search("Eiffel", k=1)[0].page_content.startswith("The Eiffel Tower")
"""


@pytest.mark.parametrize("order", ["tgi_nb first", "cookbook first", "cookbook with its own settings first"])
def test_pipeline_lives_beside_the_cookbooks_own_chroma(order, tmp_path):
    """The notebooks teach both tgi_nb.rag and the cookbook's Chroma.from_documents(...): in one kernel, in either
    order, neither may break the other (chromadb refuses a second in-memory client with other settings). Each
    order runs in a fresh interpreter, since chromadb's clients are process-wide."""
    import subprocess
    import sys

    cookbook = _COOKBOOK_CHROMA.format(
        settings=", client_settings=__import__('chromadb').config.Settings(anonymized_telemetry=False)"
        if "own settings" in order else "")
    script = _TGI_NB_RAG + cookbook if order == "tgi_nb first" else cookbook + _TGI_NB_RAG
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.glob("tgi_nb_chroma_*")), "the private Chroma folder outlives the process"


def test_a_base_url_gets_hf_token_only_on_hugging_face(monkeypatch):
    from tgi_nb.rag.pipeline import _connection

    monkeypatch.setenv("HF_TOKEN", "hf_secret_from_env")
    assert _connection("http://gpu-box:8000", None) == ("http://gpu-box:8000/v1", "-")
    assert _connection("https://x.endpoints.huggingface.cloud", None)[1] == "hf_secret_from_env"
    assert _connection("http://gpu-box:8000/v1", "k") == ("http://gpu-box:8000/v1", "k")
