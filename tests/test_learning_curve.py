"""benchmarks/bench_learning_curve.py on a tiny model and dataset: points, baselines, resumption."""

from __future__ import annotations

import json

import bench_learning_curve as curve
import pytest

from run_fixture import write_raw


def test_curve_scores_each_point_once_and_resumes(tiny_model_dir, tmp_path, capsys):
    raw = write_raw(tmp_path / "raw")
    run_dir = tmp_path / "curve"
    argv = ["--recipes", "demo-long", "--dataset", "ml-100k", "--source", str(raw), "--base_model", tiny_model_dir,
            "--sample", "16", "--valid_rows", "6", "--points", "1,2,4", "--num_beams", "2", "--sasrec_epochs", "2",
            "--save_steps", "1", "--run_dir", str(run_dir), "--set", "num_epochs=4", "--set", "batch_size=4",
            "--set", "micro_batch_size=4", "--set", "val_rows=4", "--set", "warmup_steps=0",
            "--set", "early_stopping_patience=0"]
    assert curve.main(argv) == 0
    result = json.loads((run_dir / "curve.json").read_text())
    points = result["recipes"]["demo-long"]["points"]
    assert [p["label"] for p in points] == ["epoch-1", "epoch-2", "epoch-4"]
    assert [p["step"] for p in points] == [4, 8, 16]  # 16 rows at batch 4
    assert points[0]["wall_s"] < points[1]["wall_s"] < points[2]["wall_s"]
    for p in points:
        assert p["rows"] == 6 and 0 <= p["ndcg10"] <= p["hr10"] <= 1
        assert p["ndcg10_ci"][0] <= p["ndcg10"] <= p["ndcg10_ci"][1]
        assert p["response_loss"] > 0 and p["eval_loss"] > 0 and 0 < p["distinct_top1"] <= 1
    # it ends at the last point, or at it because NDCG@10 stalled for two doublings (1 -> 4)
    assert result["recipes"]["demo-long"]["end"]["reason"].endswith("epoch 4)")
    assert set(result["baselines"]) == {"Popularity", "SASRec (same 16 rows)", "Last history title (content)"}
    assert (run_dir / "curve.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| demo-long | epoch-4 | 4 | 16 |" in out and "| demo-long | ended: " in out

    # A rerun recomputes nothing: finished points are kept as they are.
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "demo-long" / "points").glob("*.json")}
    assert curve.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "demo-long" / "points").glob("*.json")} == stamps

    # --score_only scores a snapshot that has no point yet, and neither trains nor ends the run.
    points_dir, end = run_dir / "demo-long" / "points", run_dir / "demo-long" / "end.json"
    (points_dir / "epoch-2.json").unlink()
    end.unlink()
    log = (run_dir / "demo-long" / "train" / "train_log.jsonl").read_text()
    assert curve.main([*argv, "--score_only"]) == 0
    assert (points_dir / "epoch-2.json").is_file() and not end.exists()
    assert (run_dir / "demo-long" / "train" / "train_log.jsonl").read_text() == log
    assert {p: p.stat().st_mtime_ns for p in points_dir.glob("*.json") if p.name != "epoch-2.json"} == {
        p: t for p, t in stamps.items() if p.name != "epoch-2.json"}

    # A changed scoring option rescores every point (never reuses one scored otherwise) and trains
    # nothing again; a changed baseline option retrains that baseline alone.
    stamps = {p: p.stat().st_mtime_ns for p in points_dir.glob("*.json")}
    sasrec = run_dir / "sasrec_sample16" / "scores" / "valid_5000.safetensors"
    popularity = run_dir / "popularity" / "scores" / "valid_5000.safetensors"
    before = {p: p.stat().st_mtime_ns for p in (sasrec, popularity)}
    changed = [*argv, "--num_beams", "3", "--sasrec_epochs", "3"]
    assert curve.main([*changed, "--score_only"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in stamps.items())
    assert (run_dir / "demo-long" / "train" / "train_log.jsonl").read_text() == log
    assert sasrec.stat().st_mtime_ns != before[sasrec] and popularity.stat().st_mtime_ns == before[popularity]
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "stages").glob("point_*.json")}
    assert sorted(records) == ["point_demo-long_epoch-1", "point_demo-long_epoch-2", "point_demo-long_epoch-4"]
    assert all(r["settings"]["num_beams"] == 3 for r in records.values())


def test_unknown_recipe_setting_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        curve.main(["--set", "nonsense=1", "--run_dir", str(tmp_path)])


def test_train_only_keeps_the_rows_of_data_seed_and_draws_its_own_training_rows(tiny_model_dir, tmp_path):
    """Seeds compared on the same rows: --seed draws the training rows and trains, --data_seed fixes
    prepare's samples; --train_only leaves a snapshot and scores nothing."""
    raw = write_raw(tmp_path / "raw")
    common = ["--recipes", "demo-long", "--dataset", "ml-100k", "--source", str(raw), "--base_model", tiny_model_dir,
              "--sample", "8", "--valid_rows", "6", "--points", "1", "--save_steps", "1", "--train_only",
              "--set", "num_epochs=2", "--set", "batch_size=4", "--set", "micro_batch_size=4",
              "--set", "val_rows=4", "--set", "warmup_steps=0", "--set", "early_stopping_patience=0"]
    runs = {}
    for seed, data_seed in ((1, 42), (2, 42), (2, 7)):
        run_dir = tmp_path / f"s{seed}-d{data_seed}"
        assert curve.main(common + ["--seed", str(seed), "--data_seed", str(data_seed), "--run_dir", str(run_dir)]) == 0
        train = run_dir / "demo-long" / "train"
        assert (train / "snapshots" / "epoch-1" / "adapter_model.safetensors").is_file()
        assert not (run_dir / "demo-long" / "points").exists() and not (run_dir / "baselines.json").exists()
        runs[seed, data_seed] = (run_dir, json.loads((run_dir / "demo-long" / "recipe.json").read_text()))
    rows = {key: (d / "inputs" / "valid_6.json").read_text() for key, (d, _) in runs.items()}
    assert rows[1, 42] == rows[2, 42] != rows[2, 7]
    assert runs[2, 7][1]["seed"] == 2 and runs[2, 7][1]["data_seed"] == 7


def test_recipes_are_demo_configs_with_the_curves_old_settings():
    """The curve's recipes are demo configs (shipped YAML, `bigrec demo --config NAME`): at 1,024
    rows they give the settings the curve's results were measured with."""
    demo = dict(batch_size=16, micro_batch_size=8, learning_rate=5e-4, warmup_steps=16, train_on_inputs=False,
                group_by_length=False, num_epochs=50, early_stopping_patience=5, val_rows=128)
    paper = dict(batch_size=128, micro_batch_size=8, learning_rate=1e-4, warmup_steps=20, train_on_inputs=True,
                 group_by_length=True, num_epochs=50, early_stopping_patience=5, val_rows=512)
    expected = {"demo": {**demo, "num_epochs": 1}, "demo-long": demo, "demo-long-prompt": {**demo, "train_on_inputs": True},
                "paper": paper, "paper-response": {**paper, "train_on_inputs": False}}
    assert set(expected) == set(curve.KNOWN)
    for name, settings in expected.items():
        assert curve.recipe(name, 1024) == settings, name
    assert curve.recipe("demo-long", 64)["warmup_steps"] == 1  # the demo's rule: a quarter epoch of 4 steps
    assert curve.recipe("paper", 64, {"num_epochs": "3", "train_on_inputs": "false"}) == {
        **paper, "num_epochs": 3, "train_on_inputs": False}
    with pytest.raises(curve.ConfigError, match="sample"):
        curve.recipe("demo", 1024, {"sample": "5"})  # the curve's --sample draws the rows
