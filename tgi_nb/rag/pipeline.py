"""``RagPipeline``: retrieval-augmented answers from an endpoint, built from LangChain's own parts.

The chain is the one of the cookbook (retriever -> prompt -> ChatOpenAI -> StrOutputParser, inside a
RunnableParallel that also returns the retrieved documents), with what a notebook needs around it: offline
embeddings, a Chroma store (in memory or in a folder), an indexing progress bar, relevance scores, numbered
citations and streaming.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough

from tgi_nb.endpoints.hub_session import token_for_url
from tgi_nb.progress import progress_bar

from .citations import cite, relevant
from .embeddings import local_embeddings, server_embeddings
from .loaders import PathLike, load_paths
from .prompts import rag_prompt

# Chunks embedded and stored per step of the progress bar.
INDEX_BATCH = 32


@dataclass(frozen=True)
class Source:
    """One retrieved chunk: ``number`` is its citation ``[number]`` in the answer, ``document`` where it comes
    from (``metadata["source"]``), ``chunk`` its text, ``score`` its relevance (cosine similarity, higher is
    closer).

    Example:
        >>> print(Source(1, "notes.md", "Paris is the capital of France.", 0.71))
        [1] notes.md (score 0.71): Paris is the capital of France.
    """

    number: int
    document: str
    chunk: str
    score: float
    metadata: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        text = " ".join(self.chunk.split())
        return f"[{self.number}] {self.document} (score {self.score:.2f}): {text[:160]}{'...' if len(text) > 160 else ''}"


@dataclass(frozen=True)
class Answer:
    """An answer and the sources it was given, numbered as the answer cites them (``[n]`` markers the model
    left out are added by :func:`~tgi_nb.rag.citations.cite`).

    Example:
        >>> a = Answer("Where is Paris?", "In France [1].", [Source(1, "notes.md", "Paris is in France.", 0.8)])
        >>> [s.number for s in a.cited]
        [1]
        >>> print(a)
        In France [1].
        <BLANKLINE>
        Sources:
        [1] notes.md (score 0.80): Paris is in France.
    """

    question: str
    text: str
    sources: list[Source]

    @property
    def cited(self) -> list[Source]:
        """The sources whose ``[number]`` appears in the answer."""
        return [s for s in self.sources if f"[{s.number}]" in self.text]

    @property
    def found(self) -> bool:
        """False when no passage was close to the question: the documents probably do not hold the answer."""
        return relevant(self.sources)

    def __str__(self) -> str:
        return self.text + "\n\nSources:\n" + "\n".join(str(s) for s in self.sources)


class AnswerStream:
    """A streamed answer: iterate for text pieces; ``sources`` is known before the first piece, ``answer`` once
    the stream ended (reading it finishes the stream). ``close()`` stops generation (the HTTP request is
    closed, and the server frees its slot).

    Example:
        >>> stream = rag.ask("Where is Paris?", stream=True)          # doctest: +SKIP
        >>> for piece in stream: print(piece, end="")                 # doctest: +SKIP
        >>> stream.answer.sources[0].document                         # doctest: +SKIP
    """

    def __init__(self, question: str, chunks: Iterator[dict]):
        self.question = question
        self._chunks = chunks
        self._pending: list[str] = []
        self._text: list[str] = []
        self._done = False
        self.sources: list[Source] = []
        for chunk in chunks:  # the retrieved documents come before any answer text
            if "answer" in chunk:
                self._pending.append(chunk["answer"])
            if "context" in chunk:
                self.sources = _sources(chunk["context"])
                break

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pending:
            if self._done:
                self.close()
                raise StopIteration
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                raise
            if chunk.get("answer") and not self._done:
                self._pending.append(chunk["answer"])
        piece = self._pending.pop(0)
        self._text.append(piece)
        return piece

    @property
    def text(self) -> str:
        """The answer so far."""
        return "".join(self._text)

    @property
    def answer(self) -> Answer:
        """The whole :class:`Answer` (waits for the rest of the stream)."""
        for _ in self:
            pass
        return Answer(self.question, cite(self.text, self.sources), self.sources)

    def close(self) -> None:
        """Stop the stream where it is; from another thread (a Stop button), the iterating thread stops at its
        next piece."""
        self._done = True
        self._pending.clear()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # "generator already executing": the iterating thread closes it in __next__
                pass


def _sources(docs: Sequence[Document]) -> list[Source]:
    return [Source(number=d.metadata.get("citation", i), document=str(d.metadata.get("source", "?")),
                   chunk=d.page_content, score=float(d.metadata.get("score", 0.0)), metadata=dict(d.metadata))
            for i, d in enumerate(docs, start=1)]


def format_context(docs: Sequence[Document]) -> str:
    """Retrieved documents as the prompt's numbered context, ``[n] (source) text``.

    Example:
        >>> format_context([Document("Paris is in France.", metadata={"source": "a.md", "citation": 1})])
        '[1] (a.md) Paris is in France.'
    """
    return "\n\n".join(f"[{d.metadata.get('citation', i)}] ({d.metadata.get('source', '?')}) {d.page_content}"
                       for i, d in enumerate(docs, start=1))


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _connection(target: Any, api_key: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(OpenAI base URL, key) of an endpoint, an ``openai.OpenAI`` client or a URL; (None, None) for a model."""
    if isinstance(target, BaseChatModel):
        return None, api_key
    if isinstance(target, str):
        # HF_TOKEN only for Hugging Face's hosts, as connect() sends it
        return _api_base(target), api_key or token_for_url(target, None) or "-"
    base_url = getattr(target, "base_url", None)
    if base_url is not None and hasattr(target, "chat"):  # openai.OpenAI
        return _api_base(str(base_url)), api_key or target.api_key
    url = getattr(target, "url", None)
    if isinstance(url, str):  # tgi_nb's or huggingface_hub's InferenceEndpoint
        token = api_key or getattr(getattr(target, "client", None), "token", None)
        return _api_base(url), token if isinstance(token, str) and token else "-"
    raise TypeError(f"target: expected an InferenceEndpoint, an openai.OpenAI client, a base URL or a LangChain "
                    f"chat model, got {type(target).__name__}")


# chromadb's clients share one registry of systems per process, which two threads creating clients at once
# corrupt (a KeyError 'ephemeral'): the workbench builds its RAG tab in a background thread.
_CLIENTS_LOCK = threading.Lock()


def _chroma_client(persist_directory: Optional[str]) -> Any:
    """A chromadb client that lives beside the user's own Chroma code in the same kernel, in either order.

    chromadb keeps one system per process for all in-memory clients (and one per folder) and refuses a second
    client whose settings differ ("An instance of Chroma already exists for ephemeral with different settings").
    LangChain's ``Chroma(...)`` / ``Chroma.from_documents(...)`` without a client use chromadb's default
    ``Settings()``, so ours are the defaults too (chromadb 1.x's telemetry is a no-op, and the embedding function
    is always ours, so nothing is downloaded). Where the user's code made an in-memory client with other settings
    first, ours goes to a private temporary folder instead, removed when the process exits.
    """
    import chromadb

    with _CLIENTS_LOCK:
        if persist_directory:
            return chromadb.PersistentClient(path=persist_directory)
        try:
            return chromadb.EphemeralClient()
        except ValueError as exc:
            if "different settings" not in str(exc):
                raise
        folder = tempfile.mkdtemp(prefix="tgi_nb_chroma_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return chromadb.PersistentClient(path=folder)


class RagPipeline:
    """Retrieval-augmented question answering on an endpoint, with LangChain's parts.

    - ``target``: a tgi_nb (or huggingface_hub) ``InferenceEndpoint``, an ``openai.OpenAI`` client, a base URL, or
      any LangChain chat model.
    - ``embeddings``: ``"local"`` (default: ``HuggingFaceEmbeddings`` on the local all-MiniLM-L6-v2, or ``model``
      of ``embedding_model``), ``"server"`` (the target's /v1/embeddings via ``OpenAIEmbeddings``), or any
      LangChain ``Embeddings``.
    - ``persist_directory``: a folder that keeps the Chroma collection across sessions; in memory when None.
    - ``k``, ``chunk_size``, ``chunk_overlap`` (characters), ``max_tokens``, ``temperature``: retrieval, splitting
      and generation settings; change ``k`` at will, and chunking with :meth:`reindex`.

    ``runnable`` is the LangChain runnable it built (question in, ``{"context", "question", "answer"}`` out), to
    keep composing with.

    Example:
        >>> from tgi_nb import create_inference_endpoint
        >>> from tgi_nb.rag import RagPipeline
        >>> endpoint = create_inference_endpoint("rag", repository="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...                                      type="public").wait()                # doctest: +SKIP
        >>> rag = RagPipeline(endpoint)                                                 # doctest: +SKIP
        >>> rag.add_texts(["The Eiffel Tower is 330 metres tall."])                     # doctest: +SKIP
        1
        >>> answer = rag.ask("How tall is the Eiffel Tower?")                           # doctest: +SKIP
        >>> answer.text, answer.sources[0].score                                        # doctest: +SKIP
    """

    def __init__(self, target: Any, *, model: str = "tgi", api_key: Optional[str] = None,
                 embeddings: Union[str, Embeddings] = "local", embedding_model: Optional[str] = None,
                 k: int = 4, chunk_size: int = 800, chunk_overlap: int = 100,
                 persist_directory: Optional[PathLike] = None, collection_name: Optional[str] = None,
                 max_tokens: int = 256, temperature: float = 0.0, progress: bool = True):
        _check_chunking(chunk_size, chunk_overlap)
        _check_k(k)
        self.base_url, self.api_key = _connection(target, api_key)
        if isinstance(target, BaseChatModel):
            self.llm = target
        else:
            from langchain_openai import ChatOpenAI

            self.llm = ChatOpenAI(model=model, base_url=self.base_url, api_key=self.api_key, max_tokens=max_tokens,
                                  temperature=temperature)
        self.embeddings = self._embeddings(embeddings, embedding_model)
        self.k = k
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self.progress = progress
        self.persist_directory = str(persist_directory) if persist_directory is not None else None
        # The in-memory Chroma client is shared by the whole process: a fresh name keeps pipelines apart.
        self.collection_name = collection_name or ("tgi_nb_rag" if self.persist_directory
                                                   else f"tgi_nb_rag_{uuid.uuid4().hex[:12]}")
        self.vectorstore = self._open_store()
        self._documents: dict[str, Document] = {}  # what was added, to split again in reindex()

    # -- set-up ------------------------------------------------------------------------------------
    def _embeddings(self, embeddings: Union[str, Embeddings], model: Optional[str]) -> Embeddings:
        if isinstance(embeddings, Embeddings):
            return embeddings
        if embeddings == "local":
            return local_embeddings(model)
        if embeddings == "server":
            if self.base_url is None:
                raise ValueError("embeddings: 'server' needs an endpoint, client or URL as target, not a chat "
                                 "model; pass 'local' or a LangChain Embeddings")
            return server_embeddings(self.base_url, self.api_key or "-", **({"model": model} if model else {}))
        raise ValueError(f"embeddings: must be 'local', 'server' or a LangChain Embeddings, got {embeddings!r}")

    def _open_store(self) -> Any:
        from langchain_chroma import Chroma

        return Chroma(collection_name=self.collection_name, embedding_function=self.embeddings,
                      client=_chroma_client(self.persist_directory),
                      collection_configuration={"hnsw": {"space": "cosine"}})

    def _splitter(self) -> Any:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        # Characters, not tiktoken tokens: from_tiktoken_encoder would download its BPE files.
        return RecursiveCharacterTextSplitter(chunk_size=self.chunk_size, chunk_overlap=self.chunk_overlap,
                                              add_start_index=True)

    # -- indexing ----------------------------------------------------------------------------------
    def add_texts(self, texts: Union[str, Iterable[str]], metadatas: Optional[Sequence[dict]] = None,
                  on_progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Split, embed and store texts; ``metadatas[i]["source"]`` names text ``i`` (default ``text-<n>``).
        Returns the number of chunks stored.

        Example:
            >>> rag.add_texts(["Paris is the capital of France."], [{"source": "facts"}])   # doctest: +SKIP
            1
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"metadatas: expected one per text ({len(texts)}), got {len(metadatas)}")
        docs = []
        for i, text in enumerate(texts):
            metadata = dict(metadatas[i]) if metadatas is not None else {}
            metadata.setdefault("source", f"text-{len(self._documents) + i + 1}")
            docs.append(Document(page_content=text, metadata=metadata))
        return self.add_documents(docs, on_progress=on_progress)

    def add_files(self, paths: Union[PathLike, Iterable[PathLike]],
                  on_progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Add files (.txt, .md, .html, .pdf) and folders (every such file inside, recursively).

        Example:
            >>> rag.add_files(["docs/", "notes.pdf"])                                       # doctest: +SKIP
            42
        """
        return self.add_documents(load_paths(paths), on_progress=on_progress)

    def add_documents(self, docs: Sequence[Document],
                      on_progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Split, embed (with a progress bar) and store LangChain documents; returns the chunks stored.

        Chunk ids come from the source, the position and the text, so adding the same document twice
        stores it once.
        """
        for doc in docs:
            self._documents[_doc_key(doc)] = doc
        return self._index(list(docs), on_progress)

    def _index(self, docs: list[Document], on_progress: Optional[Callable[[int, int], None]]) -> int:
        chunks = self._splitter().split_documents(docs)
        for chunk in chunks:
            chunk.metadata.setdefault("source", "?")
        ids = [_chunk_id(c) for c in chunks]
        bar = None
        if self.progress and chunks:
            bar = progress_bar("Indexing", total=len(chunks), unit="chunk")
        try:
            for start in range(0, len(chunks), INDEX_BATCH):
                batch = chunks[start:start + INDEX_BATCH]
                self.vectorstore.add_documents(batch, ids=ids[start:start + INDEX_BATCH])
                if bar is not None:
                    bar.update(len(batch))
                if on_progress is not None:
                    on_progress(start + len(batch), len(chunks))
        finally:
            if bar is not None:
                bar.close()
        return len(chunks)

    def reindex(self, chunk_size: Optional[int] = None, chunk_overlap: Optional[int] = None,
                on_progress: Optional[Callable[[int, int], None]] = None) -> int:
        """Split everything added in this session again with new settings and rebuild the store.

        Example:
            >>> rag.reindex(chunk_size=400, chunk_overlap=50)                               # doctest: +SKIP
            87
        """
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        chunk_overlap = self.chunk_overlap if chunk_overlap is None else chunk_overlap
        _check_chunking(chunk_size, chunk_overlap)
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.clear(keep_documents=True)
        return self._index(list(self._documents.values()), on_progress)

    def clear(self, keep_documents: bool = False) -> None:
        """Remove every chunk from the store (and, unless ``keep_documents``, forget the added documents)."""
        self.vectorstore.delete_collection()
        self.vectorstore = self._open_store()
        if not keep_documents:
            self._documents.clear()

    @property
    def documents(self) -> list[Document]:
        """The documents added in this session (before splitting), what :meth:`reindex` splits again."""
        return list(self._documents.values())

    def __len__(self) -> int:
        """The number of chunks in the store."""
        return len(self.vectorstore.get(include=[])["ids"])

    # -- asking ------------------------------------------------------------------------------------
    def retrieve(self, question: str, k: Optional[int] = None) -> list[Source]:
        """The ``k`` chunks closest to ``question``, best first, numbered for citation.

        Example:
            >>> rag.retrieve("capital of France", k=1)[0].document                          # doctest: +SKIP
            'facts'
        """
        return _sources(self._retrieve_documents(question, k))

    def _retrieve_documents(self, question: str, k: Optional[int] = None) -> list[Document]:
        k = self.k if k is None else k
        _check_k(k)
        # Chroma returns cosine distances; the score is the cosine similarity, 1 - distance, which may be
        # negative (LangChain's relevance scores assume [0, 1] and warn).
        found = self.vectorstore.similarity_search_with_score(question, k=k)
        return [Document(page_content=doc.page_content,
                         metadata={**doc.metadata, "score": 1.0 - float(distance), "citation": number})
                for number, (doc, distance) in enumerate(found, start=1)]

    def build_runnable(self, k: Optional[int] = None) -> Runnable:
        """The chain, as in LangChain's RAG tutorial: ``RunnableParallel(context=retriever, question=...)
        .assign(answer=prompt | llm | StrOutputParser())``; invoke it with a question."""
        retriever = RunnableLambda(lambda question: self._retrieve_documents(question, k), name="retriever")
        answer = (RunnablePassthrough.assign(context=lambda x: format_context(x["context"]))
                  | rag_prompt() | self.llm | StrOutputParser())
        return RunnableParallel(context=retriever, question=RunnablePassthrough()).assign(answer=answer)

    @property
    def runnable(self) -> Runnable:
        """The LangChain runnable of this pipeline (question -> ``{"context", "question", "answer"}``).

        Example:
            >>> (rag.runnable | (lambda out: out["answer"].upper())).invoke("Where is Paris?")  # doctest: +SKIP
        """
        return self.build_runnable()

    def ask(self, question: str, k: Optional[int] = None, stream: bool = False) -> Union[Answer, AnswerStream]:
        """Answer ``question`` from the ``k`` closest chunks: an :class:`Answer`, or with ``stream=True`` an
        :class:`AnswerStream` to iterate.

        Example:
            >>> answer = rag.ask("What is the capital of France?")                          # doctest: +SKIP
            >>> print(answer)                                                                # doctest: +SKIP
            Paris [1].
            <BLANKLINE>
            Sources:
            [1] facts (score 0.74): Paris is the capital of France.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"question: must be a non-empty string, got {question!r}")
        chain = self.build_runnable(k)
        if stream:
            return AnswerStream(question, iter(chain.stream(question)))
        out = chain.invoke(question)
        sources = _sources(out["context"])
        return Answer(question, cite(out["answer"], sources), sources)


def _check_chunking(chunk_size: Any, chunk_overlap: Any) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be an integer >= 1 (characters), got {chunk_size!r}")
    if not isinstance(chunk_overlap, int) or not 0 <= chunk_overlap < chunk_size:
        raise ValueError(f"chunk_overlap: must be an integer in [0, chunk_size={chunk_size}), got {chunk_overlap!r}")


def _check_k(k: Any) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be an integer >= 1, got {k!r}")


def _doc_key(doc: Document) -> str:
    return hashlib.sha1(f"{doc.metadata.get('source')}\0{doc.metadata.get('page')}\0{doc.page_content}"
                        .encode()).hexdigest()


def _chunk_id(chunk: Document) -> str:
    key = f"{chunk.metadata.get('source')}\0{chunk.metadata.get('page')}\0{chunk.metadata.get('start_index')}\0" \
          f"{chunk.page_content}"
    return hashlib.sha1(key.encode()).hexdigest()


__all__ = ["Answer", "AnswerStream", "RagPipeline", "Source", "format_context"]
