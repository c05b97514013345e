"""SIGKILL at a random point, then the same command again: it finishes, its outputs equal an
uninterrupted run's, and nothing half-written is ever read as finished.

Each stage runs as a user runs it (``python -m bigrec STAGE ...`` in a subprocess). The kill comes
a random moment after the stage has visibly begun its work (a progress file, a checkpoint, a
stage record), or, where a stage shows nothing until it ends, at a random fraction of an
uninterrupted run's duration.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigrec.cli import main
from run_fixture import build_run

SRC = str(Path(__file__).parents[1] / "src")


def sub_env() -> dict[str, str]:
    """This environment with src/ first on PYTHONPATH (anything already there stays after it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))}


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bigrec", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=sub_env())


def timed_run(argv: list[str]) -> float:
    started = time.monotonic()
    proc = start(argv)
    assert proc.wait(timeout=600) == 0, argv
    return time.monotonic() - started


def kill_at_random(argv: list[str], seed: int, begun: Callable[[], bool] | None = None,
                   duration: float | None = None, reset: Callable[[], None] | None = None) -> bool:
    """SIGKILL ``argv`` while its stage runs: a random moment after ``begun()`` holds, or, where a
    stage shows nothing until it ends, at a random point between the end of its imports and
    ``duration`` (an uninterrupted run's). True if the process was still running when killed.

    With ``duration``, a run that ended before the kill is tried again (after ``reset()`` clears
    its output) with the moment drawn from the first half, then the first quarter, of the stage."""
    rng = random.Random(seed)
    startup = import_seconds(argv[0]) if duration is not None else 0.0
    for attempt in range(3 if duration is not None else 1):
        proc = start(argv)
        deadline = time.monotonic() + 300
        if begun is not None:
            while not begun() and proc.poll() is None:
                assert time.monotonic() < deadline, "the stage never began its work"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(startup + rng.uniform(0.1, 0.9) / 2 ** attempt * max(duration - startup, 0.0))
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if alive or reset is None:
            return alive
        reset()
    return False


@functools.cache
def import_seconds(stage: str) -> float:
    """How long a fresh interpreter takes to import ``bigrec.cli`` and the stage's module: before
    then a kill lands in the imports, not in the stage."""
    from bigrec.cli import STAGES

    started = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import bigrec.cli, {STAGES[stage][0]}"], check=True, env=sub_env())
    return time.monotonic() - started


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
        assert kill_at_random(argv(out), seed, duration=duration, reset=lambda out=out: out.unlink(missing_ok=True)), \
            "the index was built before every kill"
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
        assert kill_at_random(argv(out), seed, duration=duration, reset=lambda out=out: shutil.rmtree(out, ignore_errors=True)), \
            "the baseline finished before every kill"
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


def train_argv(model: str, data: str, out: Path, *extra: str) -> list[str]:
    """16 rows, batch 4 in micro-batches of 2, 8 epochs: 32 steps, a checkpoint every 3 (mid-epoch
    at most of them), dropout on: resuming must restore the schedule, the data order and the RNG."""
    return ["train", "--base_model", model, "--train_data_path", data, "--output_dir", str(out),
            "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "8", "--learning_rate", "5e-3",
            "--warmup_steps", "2", "--save_steps", "3", "--precision", "fp32", *extra]


def step_losses(out: Path) -> dict[int, float]:
    from test_train import read_log

    return {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    worst = max(float((x[k] - y[k]).abs().max()) for k in x)
    assert worst <= 1e-5, f"resumed adapter differs from the uninterrupted one by {worst:.2e}"


def test_train_resumed_from_every_checkpoint_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path, one_thread):
    """Deterministic: a run folder as a kill right after checkpoint N leaves it (that checkpoint, the
    log up to it, no final adapter), for every N an uninterrupted run saved, mid-epoch or not; the
    rerun resumes there and its later losses and final adapter equal the uninterrupted run's."""
    from test_train import make_rows, write_rows

    data = write_rows(tmp_path / "d.json", make_rows(16))
    killed, whole = tmp_path / "run", tmp_path / "whole"  # the run's recorded output_dir is the killed one's
    assert main(train_argv(tiny_model_dir, data, killed, "--save_total_limit", "20")) == 0
    killed.rename(whole)
    steps = sorted(int(c.name.split("-")[1]) for c in whole.glob("checkpoint-*"))
    assert steps[:3] == [3, 6, 9] and any(s % 4 for s in steps)  # mid-epoch checkpoints among them
    expected = step_losses(whole)
    log_lines = (whole / "train_log.jsonl").read_text().splitlines()
    for step in steps[:-1]:
        killed.mkdir()
        shutil.copy(whole / "config.yaml", killed)
        shutil.copytree(whole / f"checkpoint-{step}", killed / f"checkpoint-{step}")
        kept = [line for line in log_lines if json.loads(line).get("step", 0) <= step
                and "train_runtime" not in line and json.loads(line).get("event") != "end"]
        (killed / "train_log.jsonl").write_text("\n".join(kept) + "\n")
        assert main(train_argv(tiny_model_dir, data, killed)) == 0
        starts = [r for r in map(json.loads, (killed / "train_log.jsonl").read_text().splitlines())
                  if r.get("event") == "start"]
        assert starts[-1]["global_step"] == step  # resumed there, not restarted
        assert step_losses(killed) == pytest.approx(expected, rel=1e-4), f"resumed at step {step}"
        assert_same_adapter(whole, killed)
        shutil.rmtree(killed)


def test_train_killed_at_random_continues_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path, one_thread):
    """A real SIGKILL while training runs (the process was alive when the signal went): the rerun
    resumes at the last complete checkpoint and ends as a run that was never killed. Every part runs
    on one thread, in the subprocess and here: fp32 sums in another order differ in the last digits."""
    from test_train import make_rows, read_log, write_rows

    data = write_rows(tmp_path / "d.json", make_rows(16))
    whole = tmp_path / "whole"
    assert main(train_argv(tiny_model_dir, data, whole)) == 0
    killed = tmp_path / "killed"

    def begun() -> bool:
        return any((c / "trainer_state.json").is_file() for c in killed.glob("checkpoint-*"))

    assert kill_at_random(train_argv(tiny_model_dir, data, killed), seed=3, begun=begun), \
        "training ended before the kill"
    assert not (killed / "adapter_model.safetensors").exists(), "a killed run must not look finished"
    assert main(train_argv(tiny_model_dir, data, killed)) == 0
    starts = [r for r in read_log(killed) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[-1]["global_step"] > 0  # resumed, not restarted
    assert step_losses(killed) == pytest.approx(step_losses(whole), rel=1e-4)
    assert_same_adapter(whole, killed)


def test_demo_killed_at_random_finishes_with_the_uninterrupted_metrics(tiny_model_dir, tmp_path):
    """SIGKILL anywhere after tuning (generation, index, baselines or evaluation): the same command
    finishes, and its comparison equals that of a demo that was never killed."""
    from common import demo_args, write_small_movielens

    source = write_small_movielens(tmp_path)

    def argv(run: Path) -> list[str]:
        return demo_args(run, tiny_model_dir, source, decoding="free")

    whole = tmp_path / "whole"
    duration = timed_run(argv(whole))
    killed = tmp_path / "killed"
    assert kill_at_random(argv(killed), seed=5, duration=duration,
                          reset=lambda: shutil.rmtree(killed, ignore_errors=True)), "the demo finished before every kill"
    assert main(argv(killed)) == 0

    def comparison(run: Path) -> dict:
        return json.loads((run / "metrics" / "comparison.json").read_text())["protocols"]

    assert comparison(killed) == comparison(whole)
    assert (json.loads((killed / "results" / "free" / "test.json").read_text())
            == json.loads((whole / "results" / "free" / "test.json").read_text()))
