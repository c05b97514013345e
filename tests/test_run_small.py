"""``benchmarks/run_small.py`` (``make bench``): every benchmark has small arguments, and the
harness runs benchmarks end to end on its tiny demo run, reporting each one's exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import run_small

SCRIPT = Path(run_small.__file__)


def test_every_benchmark_says_how_it_runs_small():
    assert run_small.scripts() and set(run_small.scripts()) == set(run_small.SMALL)


def test_harness_runs_benchmarks_on_its_tiny_demo_run(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--only", "bench_grounding,bench_likelihood", "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| benchmark |"):].splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| bench_grounding", "0"], ["| bench_likelihood", "0"]]
    likelihood = (tmp_path / "logs" / "bench_likelihood.log").read_text()
    assert "chosen on 4 validation rows" in likelihood and "distinct top-1 titles" in likelihood
    assert (tmp_path / "run" / "results" / "likelihood" / "test.json").is_file()  # the demo ran all decodings
    # --valid_only: validation ranked and summarised, the test rows left for the chosen snapshot
    out = tmp_path / "valid_only"
    cmd = [sys.executable, str(SCRIPT.with_name("bench_likelihood.py")), "--run", str(tmp_path / "run"),
           "--valid_rows", "4", "--knobs", "w0,w0-new", "--batch_size", "4", "--valid_only", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "demo" / "valid_summary.json").read_text())
    assert set(summary["validation_ndcg10"]) == {"w0", "w0-new"} and summary["valid_rows"] == 4
    assert summary["chosen"] == max(summary["validation_ndcg10"], key=summary["validation_ndcg10"].get)
    assert not (out / "demo" / "test").exists() and not (out / "demo" / "summary.json").exists()


def test_unknown_benchmark_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "bench_nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown benchmarks ['bench_nope']" in proc.stderr
