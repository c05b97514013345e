"""Measuring on a CPU or a GPU: syncs, peak memory, time limits, step timers, and the check rows."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_gib() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak GPU memory allocated by torch inside the block; on a CPU the peak RSS, sampled every 10 ms."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def gib(self) -> float:
        return self.peak / 2**30


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise TimeoutError in the main thread when the block runs longer than ``seconds``."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} ran over the {seconds:g} s limit (--timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class OnDevice:
    """A tokenizer whose encodings land on ``device`` (what ``device_map="auto"``'s hooks do for the
    reference scripts) and that keeps the token ids it is asked to ``batch_decode`` (in ``decoded``);
    every other attribute, read or set, is the wrapped tokenizer's."""

    def __init__(self, tokenizer, device):
        object.__setattr__(self, "_tok", tokenizer)
        object.__setattr__(self, "_device", device)
        object.__setattr__(self, "decoded", [])

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs).to(self._device)

    def batch_decode(self, sequences, *args, **kwargs):
        self.decoded.extend(sequences.tolist())
        return self._tok.batch_decode(sequences, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)


@contextlib.contextmanager
def timed_trainers():
    """While inside, every ``transformers.Trainer`` built (bigrec's subclass and the reference's
    plain one alike) records the end of each optimizer step -> [(step, seconds)]."""
    from transformers import Trainer, TrainerCallback

    times: list[tuple[int, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            times.append((state.global_step, time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append((state.global_step, time.perf_counter()))

    original = Trainer.__init__

    def timed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StepTimer())

    Trainer.__init__ = timed_init
    try:
        yield times
    finally:
        Trainer.__init__ = original


def steps_rate(times: list[tuple[int, float]], warmup: int, steps: int, tokens_per_step: float) -> float:
    marks = dict(times)  # step -> time at its end (0 = the start of training)
    last = warmup + steps
    if warmup not in marks or last not in marks:
        raise RuntimeError(f"step times recorded for steps {sorted(marks)}, need {warmup} and {last}")
    return tokens_per_step * steps / (marks[last] - marks[warmup])


def row(check: str, name: str, shape: str | None = None, unit: str | None = None) -> dict:
    return {"check": check, "name": name, "shape": shape, "status": "ok", "unit": unit, "bigrec": None,
            "reference": None, "ratio": None, "agreement": None, "details": {}, "error": None, "seconds": None}


def fail(r: dict, exc: BaseException, what: str | None = None) -> None:
    """Mark the row failed; a row that already failed keeps its first error and gains this one."""
    traceback.print_exc()
    message = one_line(exc)
    message = f"{what}: {message}" if what else message
    r["error"] = f"{r['error']}; {message}" if r["status"] == "FAIL" else message
    r["status"] = "FAIL"

