"""A keyed stage runner: a pipeline's steps skip when their settings and inputs are unchanged.

Each step records the key it ran with (its settings and the keys of the steps it comes after) in
``<folder>/stages/<name>.json``; a rerun skips a step whose key matches and whose outputs exist, so a
finished pipeline reruns in seconds and a changed setting reruns only what it affects. ``bigrec
demo`` and the benchmarks that chain stages (``bench_learning_curve``) run through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from bigrec import io

log = logging.getLogger(__name__)


class StageRunner:
    """Run a stage unless its recorded key (settings + upstream keys) matches and outputs exist.

    Paths inside the run folder enter the key relative to it, so a run folder that is moved or
    copied (``bench_quality --adapter`` starts from a copy) reruns nothing. Records written
    before that rule (keys of the paths as given) are still honoured."""

    def __init__(self, run_dir: Path):
        self.run_dir = str(run_dir)
        self.dir = run_dir / "stages"
        self.keys: dict[str, str] = {}
        self.legacy_keys: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def portable(self, value: object) -> object:
        if isinstance(value, list):
            return [self.portable(v) for v in value]
        if isinstance(value, str) and (value == self.run_dir or value.startswith(self.run_dir + "/")):
            return "<run>" + value[len(self.run_dir):]
        return value

    def recorded(self, name: str) -> bool:
        """Whether ``name`` has run before in this folder (with these settings or others)."""
        return (self.dir / f"{name}.json").is_file()

    @staticmethod
    def key_of(settings: dict, after: dict) -> str:
        payload = json.dumps({"settings": settings, "after": after}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def run(self, name: str, settings: dict, outputs: list[Path], fn: Callable[[], object],
            after: tuple[str, ...] = ()) -> bool:
        settings = json.loads(json.dumps(settings, default=str))
        key = self.keys[name] = self.key_of({k: self.portable(v) for k, v in settings.items()},
                                            {a: self.keys[a] for a in after})
        legacy = self.legacy_keys[name] = self.key_of(settings, {a: self.legacy_keys[a] for a in after})
        record = self.dir / f"{name}.json"
        if record.is_file() and all(p.exists() for p in outputs):
            done = json.loads(record.read_text())
            if done.get("key") in (key, legacy):
                log.info("[%s] up to date (settings unchanged), skipped", name)
                self.timings[name] = 0.0
                return False
        log.info("[%s] running", name)
        started = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - started
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished without writing {', '.join(missing)}")
        io.write_json(record, {"key": key, "settings": settings,
                               "seconds": round(self.timings[name], 1)})
        log.info("[%s] done in %.1fs", name, self.timings[name])
        return True
