"""Helpers the benchmark scripts and the tests' tools share. Importing it loads neither torch nor bigrec."""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    """Wait until ``bigrec serve`` (``proc``, stdout piped as text) answers ``/health`` with 200."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bigrec serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("bigrec serve did not come up")
        time.sleep(0.3)


def __getattr__(name: str) -> int:
    """``K10``: the position of K=10 in ``bigrec.evaluation.metrics.TOPK``, read on first use."""
    if name == "K10":
        from bigrec.evaluation.metrics import TOPK

        return list(TOPK).index(10)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
