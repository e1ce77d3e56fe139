"""A real JupyterLab for the browser tests (tests/test_widgets_browser.py) and the README's screenshots
(docs/screenshots.py): ``jupyter lab`` on a free port with a token, its kernels importing this checkout, no
news toast over the widgets, stopped as a user stops it (its kernels, and their endpoints, shut down).

    with running_lab(root) as (base, token):
        page.goto(f"{base}/lab/tree/notebook.ipynb?token={token}")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"

# True once the notebook open in the page has a kernel and it is idle (the page's JupyterLab app is exposed).
KERNEL_IDLE = """() => {
  const nb = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = nb && nb.sessionContext && nb.sessionContext.session && nb.sessionContext.session.kernel;
  return kernel && kernel.status === 'idle';
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_lab(root: Path, env: Optional[dict[str, str]] = None, start_timeout: float = 180) -> Iterator[tuple[str, str]]:
    """``jupyter lab`` serving ``root``, its settings and runtime files inside ``root``; ``env`` is added to the
    server's (and its kernels') environment. Yields (base URL, token); its log is ``root / "jupyter.log"``."""
    settings = root / ".settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True, exist_ok=True)
    # No "Would you like to get notified about news?" toast over the widgets (and no fetch: we are offline).
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), os.urandom(12).hex()
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "JUPYTER_RUNTIME_DIR": str(root / ".runtime"), "JUPYTER_DATA_DIR": str(root / ".data"),
                **(env or {})}
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={root / '.workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(root / "jupyter.log", "w")
    server = subprocess.Popen(command, cwd=root, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not start: " + (root / "jupyter.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, token
    finally:
        server.send_signal(signal.SIGINT)  # jupyter shuts its kernels down (and their endpoints) on SIGINT x2
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
        log.close()
