"""Helpers the benchmark scripts and the tests' tools share: a free port, waiting for ``bigrec
serve``, a benchmark setting in its own process, and the small demo (its settings, its made-up ml-100k, its command line) that the tests'
demo runs and ``run_small.py``'s run on. Importing it loads neither torch nor bigrec; it imports
no test module and no other benchmark, so both sides import it (pytest puts benchmarks/ on the
path, pyproject's ``pythonpath``)."""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

# The demo's small settings: the tests' demo runs (tests/test_demo.py), run_small.py's run, bench_quality's.
DEMO_SMALL = {"sample": 32, "num_epochs": 1, "batch_size": 8, "micro_batch_size": 8, "val_rows": 8,
              "test_rows": 12, "valid_rows": 10, "num_beams": 2, "constrained_beams": 3, "gen_batch_size": 4,
              "max_new_tokens": 12, "sasrec_epochs": 3, "precision": "fp32"}


def write_small_movielens(root: Path, users: int = 40, items: int = 25, per_user: int = 14) -> Path:
    """ml-100k official layout with a learnable pattern: users watch consecutive movies."""
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    lines = []
    for u in range(1, users + 1):
        start = rng.randrange(items)
        for k in range(per_user):
            lines.append(f"{u}\t{(start + k) % items + 1}\t{rng.randint(1, 5)}\t{1000 + 10 * k + u}\n")
    (folder / "u.data").write_text("".join(lines))
    (folder / "u.item").write_text("".join(f"{i}|Movie {i} ({1980 + i})|01-Jan-1995||x|0\n"
                                           for i in range(1, items + 1)))
    return folder


def demo_args(run_dir: Path, model: str, source: Path, **over) -> list[str]:
    """``bigrec demo``'s argv at the small settings on ``source``; free and constrained decoding
    unless ``over`` says otherwise (the default's likelihood ranking has its own test)."""
    opts = {"run_dir": run_dir, "base_model": model, "source": source, "decoding": "both", **DEMO_SMALL, **over}
    return ["demo", *[x for k, v in opts.items() for x in (f"--{k}", str(v))]]


def run_child(name: str, cmd: list[str], result_file: Path, log_file: Path) -> dict | None:
    """Run one setting of a benchmark in its own process (so its peak RSS is its own), its output
    in ``log_file``: the JSON it wrote to ``result_file``, or None (the log's tail printed) if it failed."""
    import json

    result_file.unlink(missing_ok=True)
    print(f"[{name}] running in a subprocess (log: {log_file}) ...", flush=True)
    started = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode or not result_file.is_file():
        tail = log_file.read_text().splitlines()[-15:]
        print(f"[{name}] FAILED (exit {proc.returncode}):\n  " + "\n  ".join(tail), flush=True)
        return None
    print(f"[{name}] process finished in {time.perf_counter() - started:.0f}s", flush=True)
    return json.loads(result_file.read_text())


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
