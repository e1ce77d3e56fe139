"""The URL a browser must use to reach a server that listens on the kernel's loopback interface.

Kernel-side clients (openai, huggingface_hub, LangChain) always use ``http://127.0.0.1:PORT``; a browser tab
(the /docs page, the links the widgets show) may be on another machine:

- ``TGI_NB_BROWSER_URL`` set to a template such as ``https://my-host/proxy/{port}``: that, for any setup;
- Google Colab: the URL ``google.colab.kernel.proxyPort(PORT)`` gives;
- JupyterHub and Binder (``JUPYTERHUB_SERVICE_PREFIX`` set): ``{prefix}proxy/PORT`` through
  jupyter-server-proxy, a path on the page's own origin;
- otherwise (JupyterLab on this machine): the loopback URL itself.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional


@lru_cache(maxsize=64)
def _colab_url(port: int) -> Optional[str]:
    try:
        from google.colab.output import eval_js  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(eval_js(f"google.colab.kernel.proxyPort({port})")).rstrip("/")


def browser_url(port: int, loopback: str) -> str:
    """Where a browser reaches the server listening on ``port`` (no trailing slash).

    Example:
        >>> os.environ.pop("TGI_NB_BROWSER_URL", None); os.environ.pop("JUPYTERHUB_SERVICE_PREFIX", None)
        >>> browser_url(8080, "http://127.0.0.1:8080")
        'http://127.0.0.1:8080'
        >>> os.environ["JUPYTERHUB_SERVICE_PREFIX"] = "/user/ada/"
        >>> browser_url(8080, "http://127.0.0.1:8080")
        '/user/ada/proxy/8080'
        >>> del os.environ["JUPYTERHUB_SERVICE_PREFIX"]
    """
    template = os.environ.get("TGI_NB_BROWSER_URL")
    if template:
        return template.format(port=port).rstrip("/")
    colab = _colab_url(port)
    if colab:
        return colab
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if prefix:
        return f"{prefix.rstrip('/')}/proxy/{port}"
    return loopback
