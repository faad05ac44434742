"""A server on a loopback port in a background thread: what tests, benchmarks and the
screenshot script start when they need a real HTTP server in-process."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", ready_timeout: float = 120.0
                   ) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port of ``host``; yields ``http://host:port`` once
    ``/health`` answers 200 (its models are loaded), and stops the server on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    try:
        wait_healthy(url, ready_timeout, thread)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_healthy(url: str, timeout: float, thread: threading.Thread | None = None) -> None:
    """Poll ``url/health`` until it answers 200 (RuntimeError after ``timeout`` s)."""
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"the server at {url} stopped while starting")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"{e.code} {e.read()[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"the server at {url} was not healthy after {timeout:.0f} s: {last}")
