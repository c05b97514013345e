"""``benchmarks/device_check.py --tiny`` runs end to end on a CPU and reports every check as passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
SHAPES = ("smollm2-135m", "qwen2-0.5b", "llama-7b")


def test_tiny_device_check_reports_every_check_ok(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--skip_tests", "--json", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| check | status |" in proc.stdout  # the markdown table goes to stdout

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["tiny"] is True and not any(r["check"] == "pytest" for r in rows)
    by_key = {(r["check"], r["shape"], r["details"].get("micro_batch_size")): r for r in rows}
    by_key = {(c, s) if c != "sweep" else (c, s, m): r for (c, s, m), r in by_key.items()}
    expected = ({("accelerate", None)} | {(c, f"{s} (tiny)") for s in SHAPES for c in ("train", "generate", "embed",
                                                                                      "likelihood")}
                | {("sweep", f"{s} (tiny)", m) for s in SHAPES for m in (2, 8)})
    assert set(by_key) == expected and len(rows) == len(expected)
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None, r
        if r["check"] != "accelerate":
            assert r["bigrec"] > 0 and r["reference"] > 0, r
            assert abs(r["ratio"] - r["bigrec"] / r["reference"]) < 1e-9
        if r["check"] in ("generate", "embed", "accelerate"):
            assert 0.0 <= r["agreement"] <= 1.0, r
        if r["check"] == "sweep":  # packed training against the train row's reference rate, with its MFU
            train = by_key[("train", r["shape"])]
            assert r["reference"] == train["reference"] and 0 < r["details"]["mfu"] < 1, r
        if r["check"] == "likelihood":
            assert 0 <= r["details"]["certified"] <= r["details"]["rows"], r
    for shape in SHAPES:
        train = by_key[("train", f"{shape} (tiny)")]["details"]
        assert train["bigrec_peak_gib"] > 0 and train["reference_peak_gib"] > 0
        assert train["bigrec_steps"] == train["reference_steps"] == train["steps_timed"] + train["steps_untimed"]
        assert 0 < train["bigrec_mfu"] < 1 and 0 < train["reference_mfu"] < 1
        gen = by_key[("generate", f"{shape} (tiny)")]["details"]
        assert gen["bigrec_new_tokens"] == gen["reference_new_tokens"] == [gen["new_tokens"]]  # fixed length
    accel = by_key[("accelerate", None)]
    assert accel["details"]["adapters_equal"] is True
    assert accel["details"]["lora_B_max_abs"] > 0  # the adapters did train
    assert accel["agreement"] == 1.0


def test_checks_and_sweep_flags_choose_the_rows(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--skip_tests", "--skip_accelerate", "--shapes", "smollm2-135m",
           "--checks", "sweep,likelihood", "--sweep", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["check"], r["details"].get("micro_batch_size")) for r in rows] == [("sweep", 4), ("likelihood", None)]
    sweep = rows[0]
    assert sweep["bigrec"] > 0 and sweep["reference"] is None and sweep["ratio"] is None  # no train row to compare
    bad = subprocess.run([sys.executable, str(SCRIPT), "--checks", "train,nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown checks ['nope']" in bad.stderr
