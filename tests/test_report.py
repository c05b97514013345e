"""Reporting: metrics JSON shape, table contents, PNG output."""

from __future__ import annotations

import json

import pytest

from bigrec.evaluation.report import format_table, metrics_json, plot_metrics

RUNS = {
    "plain": {"NDCG": [0.1, 0.2, 0.25, 0.3, 0.32, 0.35], "HR": [0.1, 0.3, 0.4, 0.5, 0.6, 0.8]},
    "popularity": {"NDCG": [0.123456, 0.2, 0.25, 0.3, 0.32, 0.35], "HR": [0.2, 0.3, 0.4, 0.5, 0.6, 0.9]},
}


def test_metrics_json_shape_round_trips():
    out = metrics_json(RUNS)
    assert list(out) == ["topk", "plain", "popularity"]
    assert out["topk"] == [1, 3, 5, 10, 20, 50]
    assert out["plain"] == RUNS["plain"]
    assert json.loads(json.dumps(out)) == out
    assert metrics_json(out) == out  # a loaded metrics file (with "topk") is accepted as input


def test_metrics_json_rejects_wrong_length():
    with pytest.raises(ValueError, match="'bad': HR needs 6 values"):
        metrics_json({"bad": {"NDCG": [0.0] * 6, "HR": [0.0] * 5}})


def test_format_table_contents():
    table = format_table(metrics_json(RUNS), ks=[1, 10])
    lines = table.splitlines()
    assert lines[0].split() == ["run", "NDCG@1", "NDCG@10", "HR@1", "HR@10"]
    assert lines[2].split() == ["plain", "0.1000", "0.3000", "0.1000", "0.5000"]
    assert lines[3].split() == ["popularity", "0.1235", "0.3000", "0.2000", "0.5000"]
    assert len(format_table(RUNS).splitlines()[0].split()) == 13
    with pytest.raises(ValueError, match="not in topk"):
        format_table(RUNS, ks=[7])


def test_plot_metrics_writes_png(tmp_path):
    path = plot_metrics(RUNS, tmp_path / "plots" / "metrics.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.png"]  # no temporary left behind
