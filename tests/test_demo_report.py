"""The demo's report (bigrec.evaluation.demo_report): one model, the verdicts in words, a chart of
NDCG@10 with its intervals, the same verdicts in report.md and report.html, the tables folded."""

from __future__ import annotations

import html
import re

import pytest
import torch

from bigrec.evaluation.comparison import Comparison
from bigrec.evaluation.demo_report import (
    CHART,
    build_demo_report,
    render_html,
    render_markdown,
    verdicts_of,
    write_demo_report,
)
from bigrec.evaluation.metrics import TOPK
from bigrec.evaluation.report import plot_metrics

J = TOPK.index(10)
FEW = "SASRec (same 32 examples)"


def at10(value: float, others: float = 0.0) -> list[float]:
    return [value if k == 10 else others for k in TOPK]


def ci10(low: float, high: float) -> list[list[float]]:
    return [[low, high] if k == 10 else [0.0, 0.0] for k in TOPK]


def method(ndcg: float) -> dict:
    return {"NDCG": at10(ndcg), "HR": at10(2 * ndcg)}


def interval(low: float, high: float) -> dict:
    return {"ci": {"NDCG": ci10(low, high), "HR": ci10(2 * low, 2 * high)}}


def pair(diff: float, low: float, high: float) -> dict:
    return {"NDCG": {"diff": at10(diff), "ci": ci10(low, high)}, "HR": {"diff": at10(diff), "ci": ci10(low, high)}}


def protocol(shift: float = 0.0) -> dict:
    """One protocol as the demo's side_by_side returns it (less "infos"): BIGRec (free) above the
    content baseline, below popularity, tied with both SASRecs; one pair not against the lead row."""
    values = {"BIGRec (free)": 0.05, "BIGRec (free) + CI (SASRec)": 0.07, "BIGRec (constrained)": 0.03,
              "SASRec": 0.06, FEW: 0.04, "Popularity": 0.09, "Last history title (content)": 0.01}
    metrics = {name: method(v + shift) for name, v in values.items()} | {"Random": method(0.004)}
    intervals = {name: interval(v + shift - 0.02, v + shift + 0.02) for name, v in values.items()}
    paired = {f"BIGRec (free) minus {FEW}": pair(0.01, -0.01, 0.03),
              "BIGRec (free) minus Last history title (content)": pair(0.04, 0.02, 0.06),
              "BIGRec (free) minus Popularity": pair(-0.04, -0.07, -0.01),
              "BIGRec (free) minus SASRec": pair(-0.01, -0.03, 0.01),
              "BIGRec (free) + CI (SASRec) minus SASRec": pair(0.01, 0.001, 0.02)}
    return {"metrics": metrics, "intervals": intervals, "paired": paired}


def diagnostics(**extra) -> dict:
    return {"distinct_top1_share": 0.5, "exact_title_top1_share": 1.0, "empty_top1": 0,
            "most_frequent_top1": [["Movie 3 (1983)", 4], ["Movie 5 (1985)", 2]], **extra}


INFOS = {"free": {"diagnostics": diagnostics(history_copy_top1_share=0.25),
                  "popularity": {"gammas": {"single": 0.5, "NDCG": [0.5] * 6}},
                  "CI": {"gammas": {"single": 1.0, "NDCG": [1.0] * 6}, "blend": {"weight": 0.3}}},
         "likelihood": {"diagnostics": diagnostics(certified_top10_share=0.75)}}
SETTINGS = {"dataset": "ml-100k", "base_model": "tiny", "test_rows": 12, "num_beams": 2, "ground_beams": 1,
            "constrained_beams": 3, "search_nodes": 96, "prior_weight": 0.0, "exclude_history": True,
            "seed": 42}


def report(compared: dict | None = None):
    compared = compared or {"reference": protocol(), "unseen": protocol(0.01)}
    return build_demo_report(compared, INFOS, SETTINGS, "LoRA on 32 sampled examples", "last layer, mean over "
                             "tokens, natural titles", {"prepare": 3.2, "train": 0.0}, 125.0)


def test_verdicts_follow_the_paired_interval_of_ndcg10():
    part = report().protocols[0]
    assert part.key == "reference"
    assert [(v.baseline, v.word) for v in part.verdicts] == [
        (FEW, "cannot be told apart from"), ("Last history title (content)", "beats"),
        ("Popularity", "is beaten by"), ("SASRec", "cannot be told apart from")]  # only the lead row's pairs
    sentences = [v.sentence for v in part.verdicts]
    assert sentences[1] == ("BIGRec (free) beats Last history title (content): NDCG@10 difference "
                            "+0.0400 [+0.0200, +0.0600] (paired 95% interval).")
    assert sentences[2] == ("BIGRec (free) is beaten by Popularity: NDCG@10 difference "
                            "-0.0400 [-0.0700, -0.0100] (paired 95% interval).")
    assert sentences[0].startswith(f"BIGRec (free) cannot be told apart from {FEW}: NDCG@10 difference +0.0100 "
                                   "[-0.0100, +0.0300]")
    assert part.headline == ("With every item ranked (the reference protocol), BIGRec (free) beats 1, is beaten "
                             "by 1 and cannot be told apart from 2 of the 4 baselines at NDCG@10. The highest "
                             "NDCG@10 is Popularity's, 0.0900 [0.0700, 0.1100] (95% interval).")


def test_the_lead_row_is_free_decoding_else_the_first_decoding_there_is():
    only = protocol()
    only["metrics"] = {k: v for k, v in only["metrics"].items() if not k.startswith("BIGRec (free)")}
    only["paired"] = {"BIGRec (constrained) minus Popularity": pair(0.01, 0.005, 0.02)}
    built = report({"reference": only, "unseen": only})
    assert built.lead == "BIGRec (constrained)"
    assert [v.sentence.split(":")[0] for v in built.protocols[1].verdicts] == ["BIGRec (constrained) beats Popularity"]
    assert verdicts_of(protocol()["paired"], None) == []


def test_verdicts_on_a_real_comparison_agree_with_its_intervals():
    """The same words from bigrec.evaluation.comparison's own output: a clear winner beats, a copy is tied."""
    gen = torch.Generator().manual_seed(0)
    cmp = Comparison(200)
    cmp.add("BIGRec (free)", torch.ones(200, dtype=torch.long))  # always first
    cmp.add("Popularity", torch.randint(20, 500, (200,), generator=gen))
    cmp.add("SASRec", torch.ones(200, dtype=torch.long))
    paired = cmp.paired([("BIGRec (free)", "Popularity"), ("BIGRec (free)", "SASRec"), ("Popularity", "SASRec")])
    words = {v.baseline: v.word for v in verdicts_of(paired, "BIGRec (free)")}
    assert words == {"Popularity": "beats", "SASRec": "cannot be told apart from"}
    assert [v.word for v in verdicts_of(paired, "Popularity")] == ["is beaten by"]


def test_markdown_and_html_carry_the_same_verdicts_and_figures():
    built = report()
    text = render_markdown(built, f"metrics/{CHART}")
    page = html.unescape("\n".join(render_html(built)))
    sentences = [v.sentence for part in built.protocols for v in part.verdicts]
    assert len(sentences) == 8
    for sentence in sentences + [part.headline for part in built.protocols]:
        assert sentence in text and sentence in page, sentence
    # the verdicts come first, then the chart, then the tables
    assert text.index("## Verdicts") < text.index(f"![NDCG@10 with its 95% interval, per method](metrics/{CHART})") \
        < text.index("## 95% intervals and paired differences")
    for shown in ("Dataset ml-100k, base model tiny, LoRA on 32 sampled examples; 12 test rows",
                  "Wall time 2.1 min", "95% intervals and paired differences, each user's seen items left out",
                  f"BIGRec (free) minus {FEW}: NDCG@10", "25.0% copy a title from the user's own history",
                  "100.0% are exact catalogue titles", "the top 10 is provably exact in 75.0% of rows",
                  "blend weight 0.3", "BIGRec (free) 0.0500 (above a random ranking)", "0.0300 [0.0100, 0.0500]",
                  '"Movie 3 (1983)" x4'):
        assert shown in text and shown in page, shown
    assert "| seed | 42 |" in text and "<td>seed</td><td>42</td>" in page
    assert "## Decoding: free" in text and "## Decoding: likelihood" in text and "prepare 3, train 0" in text
    assert "grounded the reference way" not in text  # no reference grounding row in this comparison


def test_written_report_embeds_the_chart_and_folds_the_tables(tmp_path):
    compared = {"reference": protocol(), "unseen": protocol(0.01)}
    plot_metrics(compared["reference"]["metrics"], tmp_path / "metrics" / "side_by_side.png")
    paths = write_demo_report(tmp_path, report(compared))
    chart = tmp_path / "metrics" / CHART
    assert paths["chart"] == chart and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert images == ["NDCG@10 with its 95% interval, per method", "NDCG@K and HR@K, every item ranked"]
    assert page.index("<h2>Verdicts</h2>") < page.index('<img alt="NDCG@10') < page.index("<details>")
    folded = re.findall(r"<details><summary>([^<]+)</summary>", page)
    assert folded == ["NDCG@K and HR@K, every item ranked",
                      "95% intervals and paired differences, the reference protocol (every item ranked)",
                      "95% intervals and paired differences, each user&#x27;s seen items left out of the ranking",
                      "Settings"]
    assert all(page.count(f"<{tag}") == page.count(f"</{tag}>") for tag in ("details", "table", "ul", "li"))
    assert "<script" not in page and 'src="http' not in page
    assert f"](metrics/{CHART})" in paths["markdown"].read_text()


def test_a_method_without_an_interval_is_charted_without_an_error_bar(tmp_path):
    compared = {"reference": protocol()}  # one protocol: one panel; Random has no interval
    built = report(compared)
    assert [c for c in built.protocols[0].chart if c[0] == "Random"] == [("Random", pytest.approx(0.004), None)]
    paths = write_demo_report(tmp_path, built)
    assert paths["chart"].stat().st_size > 0 and "side_by_side" not in paths["html"].read_text()
