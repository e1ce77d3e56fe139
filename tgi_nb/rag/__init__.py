"""Retrieval-augmented generation on an endpoint, built on LangChain: offline embeddings, a Chroma store,
loaders for text, Markdown, HTML and PDF, numbered citations and streaming.

Example:
    >>> from tgi_nb.rag import RagPipeline
    >>> rag = RagPipeline("http://127.0.0.1:8080")                       # doctest: +SKIP
    >>> rag.add_files("docs/")                                            # doctest: +SKIP
    >>> print(rag.ask("What does make test run?"))                        # doctest: +SKIP
"""

from .embeddings import local_embeddings, server_embeddings
from .loaders import SUPPORTED_SUFFIXES, UnsupportedFileError, html_to_text, load_file, load_folder, load_paths
from .pipeline import Answer, AnswerStream, RagPipeline, Source, format_context
from .prompts import RAG_SYSTEM_PROMPT, rag_prompt

__all__ = ["Answer", "AnswerStream", "RAG_SYSTEM_PROMPT", "RagPipeline", "SUPPORTED_SUFFIXES", "Source",
           "UnsupportedFileError", "format_context", "html_to_text", "load_file", "load_folder", "load_paths",
           "local_embeddings", "rag_prompt", "server_embeddings"]
