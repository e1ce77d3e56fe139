"""The child process of ``create_inference_endpoint(..., backend="process")``.

``python -m tgi_nb.endpoints.serve`` reads its endpoint from ``TGI_NB_ENDPOINT_SPEC`` (JSON written by
:class:`~tgi_nb.endpoints.backends.ProcessBackend`): the launcher's settings under TGI's variable names, the
flags of ``container_args``, the token, the port, and a control secret. It serves what ``tgi-nb serve`` serves
with those settings, plus the endpoint controls (pause, resume, scale to zero), writes its port to a file once
it answers HTTP, and exits on SIGTERM or when the process that started it is gone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading


def _parent_alive(pid: int) -> bool:
    if os.getppid() != pid:  # re-parented: the kernel died without stopping us
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def main() -> int:
    spec = json.loads(os.environ.pop("TGI_NB_ENDPOINT_SPEC"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tgi_nb.endpoints")

    from tgi_nb.server import ServerThread
    from tgi_nb.server.launcher import LaunchError

    from .runtime import build_endpoint_app

    try:
        app = build_endpoint_app(model_id=spec["model_id"], revision=spec["revision"], env=spec["env"],
                                 args=tuple(spec["args"]), api_key=spec["api_key"],
                                 accepted_key_digests=tuple(spec.get("accepted_key_digests", ())),
                                 accelerator=spec["accelerator"],
                                 scale_to_zero_after=spec["scale_to_zero_after"],
                                 control_token=spec["control_token"], files_dir=spec.get("files_dir"))
    except (LaunchError, ValueError) as exc:
        print(f"tgi_nb endpoint: error: {exc}", file=sys.stderr, flush=True)
        return 2
    host, port = spec["host"], spec["port"]
    try:
        server = ServerThread(app, host, port, log_level="info", graceful_shutdown_timeout=2.0)
    except OSError as exc:
        if not (spec["port_fallback"] and port):
            print(f"tgi_nb endpoint: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        server = ServerThread(app, host, 0, log_level="info", graceful_shutdown_timeout=2.0)
        app.controller.notes.add(f"port {port} is taken by another program: this endpoint now listens on "
                                 f"{server.port}.")
    server.start()
    port_file = spec["port_file"]
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.port))
    os.replace(port_file + ".tmp", port_file)  # atomic: the parent never reads half a number
    log.info("endpoint server on port %d (pid %d)", server.port, os.getpid())

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    parent = spec["parent_pid"]
    while not done.wait(1.0):
        if not server.is_alive or not _parent_alive(parent):
            break
    app.controller.close()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
