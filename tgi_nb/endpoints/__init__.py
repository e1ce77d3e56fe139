"""Inference Endpoints in the notebook: ``huggingface_hub``'s API, served by tgi_nb.

``create_inference_endpoint`` takes huggingface_hub's arguments and starts a TGI-style server (OpenAI routes
under /v1, TGI's routes) in a daemon thread of the kernel or in a child process; ``connect(url)`` wraps one
that runs elsewhere (TGI, vLLM, llama.cpp, a Hugging Face Inference Endpoint's URL), and
``connect(huggingface_hub_endpoint)`` a Hugging Face Inference Endpoint whose life cycle goes through
huggingface_hub. All return an ``InferenceEndpoint`` with huggingface_hub's fields and methods, one status
machine (``on_status_change``), and the same clients. Errors are huggingface_hub's own classes, so existing
``except`` clauses keep working.

Example:
    >>> import os
    >>> from openai import OpenAI
    >>> from tgi_nb import create_inference_endpoint
    >>> token = os.environ.get("HF_TOKEN", "hf_local")
    >>> endpoint = create_inference_endpoint("demo", repository="HuggingFaceTB/SmolLM2-135M-Instruct",
    ...                                      token=token)                                   # doctest: +SKIP
    >>> endpoint.wait()                                                                     # doctest: +SKIP
    >>> client = OpenAI(base_url=endpoint.url + "/v1/", api_key=token)                      # doctest: +SKIP
    >>> client.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
"""

from huggingface_hub import InferenceEndpointStatus
from huggingface_hub.errors import InferenceEndpointError, InferenceEndpointTimeoutError

from .api import connect, create_inference_endpoint, get_inference_endpoint, list_inference_endpoints
from .backends import RemoteEndpointError
from .endpoint import EndpointWarning, InferenceEndpoint, InferenceEndpointNotFoundError

__all__ = [
    "EndpointWarning",
    "InferenceEndpoint",
    "InferenceEndpointError",
    "InferenceEndpointNotFoundError",
    "InferenceEndpointStatus",
    "InferenceEndpointTimeoutError",
    "RemoteEndpointError",
    "connect",
    "create_inference_endpoint",
    "get_inference_endpoint",
    "list_inference_endpoints",
]
