"""The pieces of ``benchmarks/device_check.py``, one concern per module: made-up shapes and data
(:mod:`.shapes`), measuring (:mod:`.measure`), the training checks (:mod:`.training`), generation,
embedding and ranking checks (:mod:`.inference`), the subprocess checks (:mod:`.processes`) and the
table (:mod:`.report`). Importing any of them changes neither ``sys.path`` nor the environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1"}


def use_working_tree() -> None:
    """Put src/ (first: bigrec need not be installed), tests/ and benchmarks/ on the import path and
    QUIET_ENV's defaults in the environment; main calls it, so importing this module changes neither."""
    for path in (REPO / "benchmarks", REPO / "tests", REPO / "src"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)

