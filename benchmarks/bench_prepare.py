"""Time `bigrec prepare` on the bundled ml-100k (and ml-1m with --all); prints figures, asserts nothing."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bigrec.cli import main


def bench(dataset: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rc = main(["prepare", "--dataset", dataset, "--out", tmp])
        seconds = time.perf_counter() - started
        if rc:
            raise SystemExit(f"prepare {dataset} failed with exit code {rc}")
        stats = json.loads((Path(tmp) / "stats.json").read_text())
        print(f"prepare {dataset}: {seconds:.1f}s  users={stats['users']} items={stats['items']} "
              f"interactions={stats['interactions']} examples={stats['examples']}")


if __name__ == "__main__":
    for name in ["ml-100k", "ml-1m"] if "--all" in sys.argv else ["ml-100k"]:
        bench(name)
