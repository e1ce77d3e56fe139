"""Migration check: record what code written for OpenAI sends, replay it on open models, see what changes.

- :func:`record` wraps an ``openai.OpenAI`` client and keeps each request (and the answer it got) as a Batch
  API input file, the same format OpenAI's Batch API and tgi_nb's ``/v1/batches`` read;
- :func:`replay` sends a workload (that file, a :class:`Workload`, or request dicts) to one or more targets
  (endpoints, ``connect()``, OpenAI clients, base URLs, each with optional settings) and returns a
  :class:`Report`: per request and per target, parameters refused or ignored, errors, finish reasons,
  JSON / schema / tool-call validity, tokens, latency, similarity to the reference and exact matches;
  ``to_markdown()``, ``to_csv()``, ``plot()``.

Layering: this package uses the official ``openai`` client only (never the server's internals), so a remote TGI
or vLLM server and OpenAI itself are targets like a local endpoint; the widgets sit above it.

Example:
    >>> from tgi_nb import migrate
    >>> with migrate.record(openai_client, "workload.jsonl") as client:         # doctest: +SKIP
    ...     my_openai_code(client)
    >>> report = migrate.replay("workload.jsonl", [endpoint, (endpoint, {"temperature": 0.7})])  # doctest: +SKIP
    >>> report                                                                  # doctest: +SKIP
"""

from .recorder import Recorder, record
from .replay import Replay, replay
from .report import Outcome, Report
from .targets import ReplayTarget
from .workload import ENDPOINTS, WorkItem, Workload

__all__ = ["ENDPOINTS", "Outcome", "Recorder", "Replay", "ReplayTarget", "Report", "WorkItem", "Workload", "record",
           "replay"]
