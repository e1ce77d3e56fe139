"""The workbench: ipywidgets for endpoints, parameters, streaming chat, comparison, monitoring and RAG.

Every widget talks to endpoints through the official ``openai`` client, runs its slow work in background
threads (a handler never blocks the kernel) and shows the code it stands for.

Example:
    >>> import tgi_nb
    >>> tgi_nb.workbench()                                   # doctest: +SKIP
    >>> from tgi_nb.widgets import ChatWidget, ParametersWidget
    >>> params = ParametersWidget(temperature=0.2)
    >>> ChatWidget("http://127.0.0.1:8080", parameters=params)   # doctest: +SKIP
"""

from .chat import ChatWidget
from .compare import CompareWidget
from .endpoint import EndpointWidget
from .migration import MigrationWidget
from .monitor import MonitorWidget
from .parameters import ParametersWidget
from .transcript import Transcript
from .workbench import Workbench, workbench

__all__ = ["ChatWidget", "CompareWidget", "EndpointWidget", "MigrationWidget", "MonitorWidget", "ParametersWidget", "RagWidget",
           "Transcript", "Workbench", "workbench"]


def __getattr__(name: str):
    # RagWidget pulls in LangChain and chromadb (seconds to import): only when it is asked for.
    if name == "RagWidget":
        from .rag import RagWidget

        return RagWidget
    raise AttributeError(f"module 'tgi_nb.widgets' has no attribute {name!r}")
