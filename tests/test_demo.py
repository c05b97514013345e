"""`bigrec demo` end to end on a tiny model and a small MovieLens-format dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bigrec.cli import main
from bigrec.run_manifest import RunManifest


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
    opts = {"run_dir": run_dir, "base_model": model, "source": source, "sample": 32, "num_epochs": 1,
            "batch_size": 8, "micro_batch_size": 8, "val_rows": 8, "test_rows": 12, "valid_rows": 10,
            "num_beams": 2, "gen_batch_size": 4, "max_new_tokens": 12, "sasrec_epochs": 3, "precision": "fp32", **over}
    return ["demo", *[x for k, v in opts.items() for x in (f"--{k}", str(v))]]


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("demo")
    source = write_small_movielens(root)
    run_dir = root / "run"
    assert main(demo_args(run_dir, tiny_model_dir, source)) == 0
    return run_dir, source


def test_demo_writes_report_table_and_run_folder(finished_demo):
    run_dir, _ = finished_demo
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    assert table["topk"] == [1, 3, 5, 10, 20, 50]
    for name in ("BIGRec", "BIGRec + popularity", "BIGRec + CI (SASRec)", "SASRec", "Popularity", "Random"):
        assert len(table[name]["NDCG"]) == 6 and all(0 <= v <= 1 for v in table[name]["HR"])
    # 25 items: HR@50 of any complete ranking is 1.
    assert table["SASRec"]["HR"][-1] == 1.0 and table["BIGRec"]["HR"][-1] == 1.0
    report = (run_dir / "report.md").read_text()
    assert "Where plain BIGRec stands" in report and "random ranking" in report and "distinct" in report
    assert (run_dir / "metrics" / "side_by_side.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = RunManifest.load(run_dir)
    for field in ("catalog", "index", "adapter", "sasrec", "data"):
        assert manifest.path(run_dir, field).exists(), field
    assert len(json.loads((run_dir / "results" / "test.json").read_text())) == 12


def test_demo_rerun_reuses_every_stage(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO", logger="bigrec.demo")
    assert main(demo_args(run_dir, tiny_model_dir, source)) == 0
    ran = [r.message for r in caplog.records if r.message.endswith("] running")]
    assert ran == []


def test_demo_changed_setting_reruns_only_affected_stages(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO", logger="bigrec.demo")
    assert main(demo_args(run_dir, tiny_model_dir, source, test_rows=8)) == 0
    ran = sorted(r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running"))
    assert ran == ["evaluate", "generate_test", "generate_valid", "inputs"]
    assert len(json.loads((run_dir / "results" / "test.json").read_text())) == 8
