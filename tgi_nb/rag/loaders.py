"""Documents from files and folders, as LangChain ``Document`` objects: text, Markdown, HTML and PDF.

HTML is reduced to its visible text with the standard library's parser (scripts, styles and markup dropped);
PDF pages come from ``pypdf`` (one ``Document`` per page, ``metadata["page"]`` counted from 1). Every
document's ``metadata["source"]`` is the file's path as given.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Union

from langchain_core.documents import Document

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES

PathLike = Union[str, Path]


class UnsupportedFileError(ValueError):
    """A file whose type :func:`load_file` cannot read; the message lists the supported suffixes."""


def load_file(path: PathLike) -> list[Document]:
    """The documents in one file: one for text, Markdown and HTML, one per page for PDF.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "note.html"
        >>> _ = f.write_text("<html><style>p {}</style><body><h1>Title</h1><p>Body &amp; text</p></body></html>")
        >>> [d.page_content for d in load_file(f)]
        ['Title\\nBody & text']
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {str(path)!r}")
    if suffix in TEXT_SUFFIXES:
        docs = [Document(page_content=path.read_text(encoding="utf-8", errors="replace"),
                         metadata={"source": str(path)})]
    elif suffix in HTML_SUFFIXES:
        docs = [Document(page_content=html_to_text(path.read_text(encoding="utf-8", errors="replace")),
                         metadata={"source": str(path)})]
    elif suffix in PDF_SUFFIXES:
        docs = _load_pdf(path)
    else:
        raise UnsupportedFileError(f"path: cannot read {str(path)!r}: the supported file types are "
                                   f"{', '.join(SUPPORTED_SUFFIXES)}")
    return [d for d in docs if d.page_content.strip()]


def load_folder(folder: PathLike, pattern: str = "**/*") -> list[Document]:
    """The documents of every supported file under ``folder`` matching ``pattern`` (others are skipped),
    in path order.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.md").write_text("# A"); _ = (d / "b.bin").write_bytes(b"x")
        >>> [pathlib.Path(doc.metadata["source"]).name for doc in load_folder(d)]
        ['a.md']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"folder: not a directory: {str(folder)!r}")
    docs: list[Document] = []
    for path in sorted(folder.glob(pattern)):
        if path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES:
            docs.extend(load_file(path))
    return docs


def load_paths(paths: Union[PathLike, Iterable[PathLike]]) -> list[Document]:
    """Files and folders (folders read with :func:`load_folder`) as documents.

    Example:
        >>> load_paths([])
        []
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[Document] = []
    for path in paths:
        docs.extend(load_folder(path) if Path(path).is_dir() else load_file(path))
    return docs


def _load_pdf(path: Path) -> list[Document]:
    from pypdf import PdfReader

    reader = PdfReader(str(path))
    return [Document(page_content=page.extract_text() or "", metadata={"source": str(path), "page": number})
            for number, page in enumerate(reader.pages, start=1)]


class _TextExtractor(HTMLParser):
    _SKIP = {"script", "style", "head", "noscript", "template", "svg"}
    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
              "article", "header", "footer", "pre", "blockquote", "title", "hr", "dd", "dt"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """The visible text of an HTML page: one line per block element, runs of blanks collapsed.

    Example:
        >>> html_to_text("<p>One</p><script>x()</script><p>Two &lt;3</p>")
        'One\\nTwo <3'
    """
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)
