"""The pieces of ``benchmarks/device_check.py``, one concern per module: made-up shapes and data
(:mod:`.shapes`), measuring (:mod:`.measure`), the training checks (:mod:`.training`), generation,
embedding and ranking checks (:mod:`.inference`), the subprocess checks (:mod:`.processes`) and the
table (:mod:`.report`). Importing any of them changes neither ``sys.path`` nor the environment."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1"}
WORKING_TREE = ("src", "tests", "benchmarks")  # what a script of the working tree imports from, in this order


def working_tree_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with src/ (first: bigrec need not be installed), tests/ and
    benchmarks/ leading ``PYTHONPATH`` and QUIET_ENV's defaults."""
    env = dict(os.environ if env is None else env)
    lead = [str(REPO / name) for name in WORKING_TREE]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in lead]
    env["PYTHONPATH"] = os.pathsep.join(lead + rest)
    for key, value in QUIET_ENV.items():
        env.setdefault(key, value)
    return env


def use_working_tree() -> None:
    """Make the running script import from the working tree: unless its environment is already
    :func:`working_tree_env`'s, re-execute it (the same interpreter, options and arguments) in that
    environment. Python reads ``PYTHONPATH`` when it starts, so the path is never edited in
    process, and the subprocesses inherit it. A script's ``main`` calls it first."""
    env = working_tree_env()
    if env == dict(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
