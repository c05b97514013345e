"""SIGKILL at a random point, then the same command again: it finishes, its outputs equal an
uninterrupted run's, and nothing half-written is ever read as finished.

Each stage runs as a user runs it (``python -m bigrec STAGE ...`` in a subprocess). The kill comes
a random moment after the stage has visibly begun its work (a progress file, a checkpoint, a
stage record), or, where a stage shows nothing until it ends, at a random fraction of an
uninterrupted run's duration.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from bigrec.cli import main
from run_fixture import build_run

SRC = str(Path(__file__).parents[1] / "src")


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bigrec", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": SRC})


def timed_run(argv: list[str]) -> float:
    started = time.monotonic()
    proc = start(argv)
    assert proc.wait(timeout=600) == 0, argv
    return time.monotonic() - started


def kill_at_random(argv: list[str], seed: int, begun: Callable[[], bool] | None = None,
                   duration: float | None = None) -> bool:
    """SIGKILL ``argv`` a random moment after ``begun()`` holds (or at a random fraction of
    ``duration``); True if it was still running when killed."""
    rng = random.Random(seed)
    proc = start(argv)
    deadline = time.monotonic() + 300
    if begun is not None:
        while not begun() and proc.poll() is None:
            assert time.monotonic() < deadline, "the stage never began its work"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        time.sleep(rng.uniform(0.4, 0.95) * duration)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("kill-run"))


def many_rows(run: Path, out: Path, n: int = 48) -> Path:
    """Enough test rows (repeated, with distinct row numbers kept) for a kill to land mid-run."""
    rows = json.loads((run / "data" / "test_5000.json").read_text())
    out.write_text(json.dumps([rows[i % len(rows)] for i in range(n)]))
    return out


@pytest.mark.parametrize("decoding", ["free", "constrained"])
@pytest.mark.parametrize("seed", [0, 1])
def test_generate_killed_at_random_resumes_to_the_same_rows(run_dir, tmp_path, decoding, seed):
    rows = many_rows(run_dir, tmp_path / "rows.json")
    (tmp_path / "id2name.txt").write_text((run_dir / "data" / "id2name.txt").read_text())

    def argv(result: Path) -> list[str]:
        return ["generate", "--base_model", str(run_dir / "base"), "--lora_weights", str(run_dir / "adapter"),
                "--test_data_path", str(rows), "--result_json_data", str(result), "--decoding", decoding,
                "--num_beams", "2", "--batch_size", "2", "--max_new_tokens", "12", "--precision", "fp32"]

    whole = tmp_path / "whole" / "out.json"
    assert main(argv(whole)) == 0
    killed = tmp_path / "killed" / "out.json"

    def begun() -> bool:
        return any(len(p.read_text().splitlines()) >= 2 for p in killed.parent.glob("out.json.progress.*.jsonl"))

    assert kill_at_random(argv(killed), seed, begun), "the run ended before the kill"
    assert not killed.exists(), "a killed run must not leave a result file"
    assert main(argv(killed)) == 0
    assert json.loads(killed.read_text()) == json.loads(whole.read_text())
    assert not list(killed.parent.glob("*.progress.*")) and not list(killed.parent.glob("*.tmp"))


def test_index_killed_at_random_is_rebuilt_the_same(run_dir, tmp_path):
    def argv(out: Path) -> list[str]:
        return ["index", "--base_model", str(run_dir / "base"), "--catalog", str(run_dir / "data" / "id2name.txt"),
                "--output", str(out), "--precision", "fp32", "--batch_size", "2"]

    duration = timed_run(argv(tmp_path / "whole.safetensors"))
    for seed in range(3):
        out = tmp_path / f"killed{seed}.safetensors"
        kill_at_random(argv(out), seed, duration=duration)
        if out.exists():  # written at all means written whole
            assert load_file(out).keys() == load_file(tmp_path / "whole.safetensors").keys()
        assert main(argv(out)) == 0
        whole, again = load_file(tmp_path / "whole.safetensors"), load_file(out)
        assert all(torch.allclose(whole[k], again[k], rtol=1e-5, atol=1e-6) for k in whole if k in again)
        assert whole.keys() == again.keys()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp") or ".staging-" in p.name]


def test_baseline_killed_at_random_reruns_to_the_same_scores(run_dir, tmp_path):
    def argv(out: Path) -> list[str]:
        return ["baseline", "--model", "sasrec", "--data", str(run_dir / "data"), "--output_dir", str(out),
                "--epochs", "30", "--patience", "30", "--threads", "1"]

    duration = timed_run(argv(tmp_path / "whole"))
    for seed in range(2):
        out = tmp_path / f"killed{seed}"
        kill_at_random(argv(out), seed, duration=duration)
        if (out / "metrics.json").exists():  # the folder is swapped in whole: finished means complete
            assert (out / "scores" / "test_5000.safetensors").is_file()
        assert main(argv(out)) == 0
        assert json.loads((out / "metrics.json").read_text()) == json.loads((tmp_path / "whole" / "metrics.json").read_text())


@pytest.fixture
def one_thread(monkeypatch):
    """torch on one thread here and in the stages this test starts."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OLD_RESUME = Version(transformers.__version__) < Version("5.24")


@pytest.mark.xfail(OLD_RESUME, strict=False, reason=(
    "known defect, open: with transformers 5.2 (make test-min) a run killed at some steps resumes to an "
    "adapter up to 0.021 off the uninterrupted one (largest weight 0.25); 5.24 matches to 1e-5"))
def test_train_killed_at_random_continues_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path, one_thread):
    """The rerun resumes at the last complete checkpoint with the planned schedule and the same data
    order: every step's loss and the final adapter equal those of a run that was never killed.
    Every part runs on one thread, in the subprocess and here: fp32 sums in another order differ in
    the last digits (seen with torch 2.6 at two threads)."""
    from test_train import make_rows, read_log, write_rows

    data = write_rows(tmp_path / "d.json", make_rows(16))

    def argv(out: Path) -> list[str]:
        return ["train", "--base_model", tiny_model_dir, "--train_data_path", data, "--output_dir", str(out),
                "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "8", "--learning_rate", "5e-3",
                "--warmup_steps", "2", "--save_steps", "3", "--precision", "fp32"]

    whole = tmp_path / "whole"
    assert main(argv(whole)) == 0
    killed = tmp_path / "killed"

    def begun() -> bool:
        return any((c / "trainer_state.json").is_file() for c in killed.glob("checkpoint-*"))

    assert kill_at_random(argv(killed), seed=3, begun=begun), "training ended before the kill"
    assert not (killed / "adapter_model.safetensors").exists(), "a killed run must not look finished"
    assert main(argv(killed)) == 0

    def losses(out: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}

    starts = [r for r in read_log(killed) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["global_step"] > 0  # resumed, not restarted
    assert losses(killed) == pytest.approx(losses(whole), rel=1e-4)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_demo_killed_at_random_finishes_with_the_uninterrupted_metrics(tiny_model_dir, tmp_path):
    """SIGKILL anywhere after tuning (generation, index, baselines or evaluation): the same command
    finishes, and its comparison equals that of a demo that was never killed."""
    from test_demo import demo_args, write_small_movielens

    source = write_small_movielens(tmp_path)

    def argv(run: Path) -> list[str]:
        return demo_args(run, tiny_model_dir, source, decoding="free")

    whole = tmp_path / "whole"
    duration = timed_run(argv(whole))
    killed = tmp_path / "killed"
    kill_at_random(argv(killed), seed=5, duration=duration)
    assert main(argv(killed)) == 0

    def comparison(run: Path) -> dict:
        return json.loads((run / "metrics" / "comparison.json").read_text())["protocols"]

    assert comparison(killed) == comparison(whole)
    assert (json.loads((killed / "results" / "free" / "test.json").read_text())
            == json.loads((whole / "results" / "free" / "test.json").read_text()))
