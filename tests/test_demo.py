"""`bigrec demo` end to end on a tiny model and a small MovieLens-format dataset."""

from __future__ import annotations

import json
import re

import pytest
from common import DEMO_SMALL, demo_args, write_small_movielens

from bigrec.app.run_manifest import RunManifest
from bigrec.cli import main
from bigrec.stages.demo import candidates_ndcg


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
    bigrec = [f"BIGRec ({d}){extra}" for d in ("free", "constrained") for extra in ("", " + popularity",
                                                                                  " + CI (SASRec)")]
    reference = "BIGRec (free), reference grounding"  # the same generations, grounded the paper's way
    blend = "BIGRec (free) + CI blend (SASRec)"  # the weighted-sum variant; constrained rows have none
    few = ["BIGRec (free) + CI (SASRec, same 32 examples)", "BIGRec (free) + CI blend (SASRec, same 32 examples)"]
    assert list(table) == ["topk", *bigrec[:3], blend, *few, reference, *bigrec[3:],
                           "BIGRec (constrained) + CI (SASRec, same 32 examples)", "SASRec",
                           "SASRec (same 32 examples)", "Popularity", "Last history title (content)", "Random"]
    for name in table.keys() - {"topk"}:
        assert len(table[name]["NDCG"]) == 6 and all(0 <= v <= 1 for v in table[name]["HR"])
    # 25 items: HR@50 of any complete ranking is 1.
    assert all(table[name]["HR"][-1] == 1.0 for name in ("SASRec", "BIGRec (free)", "BIGRec (constrained)"))
    report = (run_dir / "report.md").read_text()
    assert "95% intervals and paired differences, each user's seen items left out" in report
    assert "BIGRec (free) minus SASRec (same 32 examples): NDCG@10" in report
    assert "copy a title from the user's own history" in report
    page = (run_dir / "report.html").read_text()  # one file: the plot is inside, nothing is fetched
    assert "data:image/png;base64," in page and "SASRec (same 32 examples)" in page and "Stage times" in page
    assert "<script" not in page and 'src="http' not in page
    assert "Where BIGRec stands" in report and "random ranking" in report and "distinct" in report
    assert "## Decoding: free" in report and "## Decoding: constrained" in report
    assert "last layer, mean over tokens, natural titles" in report and "grounded the reference way" in report
    assert "100.0% are exact catalogue titles" in report.split("## Decoding: constrained")[1]
    constrained = json.loads((run_dir / "results" / "constrained" / "test.json").read_text())
    assert len(constrained) == 12 and all(len(r["predict_ids"]) == 3 for r in constrained)
    assert (run_dir / "metrics" / "side_by_side.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = RunManifest.load(run_dir)
    for field in ("catalog", "index", "adapter", "sasrec", "data"):
        assert manifest.path(run_dir, field).exists(), field
    assert (manifest.pooling, manifest.embed_layer, manifest.title_text) == ("mean", -1, "natural")
    assert "chosen on validation NDCG@10" in manifest.ranking_note  # recommend/serve's default ranking
    assert manifest.use_ci == manifest.ranking_note.startswith("BIGRec + CI")
    assert (manifest.ci_blend_weight is not None) == manifest.ranking_note.startswith("BIGRec + CI (blend")
    assert len(json.loads((run_dir / "results" / "free" / "test.json").read_text())) == 12


def test_demo_comparison_holds_both_protocols_with_intervals(finished_demo):
    """comparison.json: per protocol, metrics equal to the side-by-side table (reference) or no worse
    for every ranked method (seen items left out), an interval around every value, the paired
    differences the paper's claims rest on."""
    run_dir, _ = finished_demo
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    comparison = json.loads((run_dir / "metrics" / "comparison.json").read_text())
    assert comparison["rows"] == 12 and set(comparison["protocols"]) == {"reference", "unseen"}
    reference, unseen = (comparison["protocols"][p] for p in ("reference", "unseen"))
    assert {k: v for k, v in table.items() if k != "topk"} == reference["metrics"]
    for part in (reference, unseen):
        for name, iv in part["intervals"].items():
            for key in ("NDCG", "HR"):
                for value, (lo, hi) in zip(part["metrics"][name][key], iv["ci"][key], strict=True):
                    assert lo - 1e-12 <= value <= hi + 1e-12
        pair = part["paired"]["BIGRec (free) minus SASRec (same 32 examples)"]
        expected = [a - b for a, b in zip(part["metrics"]["BIGRec (free)"]["NDCG"],
                                          part["metrics"]["SASRec (same 32 examples)"]["NDCG"], strict=True)]
        assert pair["NDCG"]["diff"] == pytest.approx(expected)
    for name in ("SASRec", "Popularity", "Last history title (content)", "BIGRec (free)", "Random"):
        assert all(u >= r - 1e-12 for u, r in zip(unseen["metrics"][name]["HR"], reference["metrics"][name]["HR"],
                                                  strict=True)), name
    # the content baseline ranks the last history item first: never the target in this data, left out when unseen
    assert reference["metrics"]["Last history title (content)"]["HR"][0] == 0.0


def test_demo_rerun_reuses_every_stage(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source)) == 0
    ran = [r.message for r in caplog.records if r.message.endswith("] running")]
    assert ran == []


def test_demo_changed_setting_reruns_only_affected_stages(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, test_rows=8)) == 0
    ran = sorted(r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running"))
    assert ran == ["evaluate_constrained", "evaluate_constrained_fewshot_ci", "evaluate_constrained_fewshot_ci_unseen",
                   "evaluate_constrained_unseen", "evaluate_free", "evaluate_free_fewshot_ci",
                   "evaluate_free_fewshot_ci_unseen", "evaluate_free_reference_grounding", "evaluate_free_unseen",
                   "generate_test_constrained", "generate_test_free", "generate_valid_constrained",
                   "generate_valid_free", "inputs"]
    assert len(json.loads((run_dir / "results" / "free" / "test.json").read_text())) == 8


def test_demo_constrained_setting_reruns_only_constrained_stages(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, test_rows=8, constrained_beams=2)) == 0
    ran = {r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running")}
    assert {"generate_test_constrained", "generate_valid_constrained", "evaluate_constrained"} <= ran
    assert not any("free" in name for name in ran)


def test_demo_one_decoding_reuses_its_stages_and_reports_it_alone(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, test_rows=8, decoding="free")) == 0
    assert [r.message for r in caplog.records if r.message.endswith("] running")] == []
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    assert "BIGRec (free)" in table and not any("constrained" in name for name in table)
    assert "## Decoding: constrained" not in (run_dir / "report.md").read_text()


def test_demo_grounding_setting_reruns_only_index_and_evaluation(finished_demo, tiny_model_dir, caplog):
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, test_rows=8, decoding="free", pooling="last",
                          title_text="bare")) == 0
    ran = sorted(r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running"))
    assert ran == ["evaluate_free", "evaluate_free_fewshot_ci", "evaluate_free_fewshot_ci_unseen",
                   "evaluate_free_unseen", "index"]  # the reference grounding needs no second row
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    assert "BIGRec (free), reference grounding" not in table
    assert RunManifest.load(run_dir).pooling == "last"



def test_demo_with_a_given_adapter_tunes_nothing_and_reuses_data_and_baselines(finished_demo, tiny_model_dir,
                                                                               tmp_path, caplog, capsys):
    """--adapter: a snapshot trained elsewhere, scored in a copy of a finished run: only the copy of the
    adapter, generation and evaluation run, and the same weights give the same generations."""
    import shutil

    run_dir, source = finished_demo
    over = dict(test_rows=8, decoding="free", pooling="last", title_text="bare")  # the tests above left these
    assert main(demo_args(run_dir, tiny_model_dir, source, **over)) == 0
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    caplog.set_level("INFO")
    assert main(demo_args(other, tiny_model_dir, source, adapter=run_dir / "adapter", **over)) == 0
    ran = sorted(r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running"))
    assert ran == ["evaluate_free", "evaluate_free_fewshot_ci", "evaluate_free_fewshot_ci_unseen",
                   "evaluate_free_unseen", "generate_test_free", "generate_valid_free", "train"]
    record = json.loads((other / "stages" / "train.json").read_text())["settings"]
    assert record["adapter"] == str((run_dir / "adapter").resolve()) and len(record["sha256"]) == 64
    for split in ("test", "valid"):
        assert (json.loads((other / "results" / "free" / f"{split}.json").read_text())
                == json.loads((run_dir / "results" / "free" / f"{split}.json").read_text()))
    assert "the LoRA adapter from" in (other / "report.md").read_text()

    caplog.clear()
    assert main(demo_args(other, tiny_model_dir, source, adapter=run_dir / "adapter", **over)) == 0
    assert [r.message for r in caplog.records if r.message.endswith("] running")] == []
    assert main(demo_args(other, tiny_model_dir, source, adapter=tmp_path / "nowhere", **over)) == 1
    err = capsys.readouterr().err
    assert "error: adapter:" in err and "nowhere" in err


def test_demo_data_seed_picks_the_rows_and_seed_the_rest(finished_demo, tiny_model_dir, tmp_path, caplog):
    """--data_seed equal to --seed changes nothing; another --data_seed draws other test rows."""
    import shutil

    run_dir, source = finished_demo
    assert main(demo_args(run_dir, tiny_model_dir, source)) == 0  # back to the defaults other tests changed
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, data_seed=42)) == 0
    assert [r.message for r in caplog.records if r.message.endswith("] running")] == []
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    caplog.clear()
    assert main(demo_args(other, tiny_model_dir, source, data_seed=7)) == 0
    ran = {r.message.split("]")[0].lstrip("[") for r in caplog.records if r.message.endswith("] running")}
    assert {"prepare", "inputs"} <= ran
    test_rows = [json.loads((d / "inputs" / "test.json").read_text()) for d in (run_dir, other)]
    assert len(test_rows[0]) == len(test_rows[1]) and test_rows[0] != test_rows[1]


def test_demo_on_new_data_trains_afresh_not_from_the_old_checkpoints(tiny_model_dir, tmp_path):
    """A run folder reused for other data: the training settings are the same, the rows are not.
    The old run's checkpoints must not be resumed (a finished run's would "continue" in no steps
    and keep its adapter)."""
    run_dir = tmp_path / "run"
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    assert main(demo_args(run_dir, tiny_model_dir, write_small_movielens(tmp_path / "a"), sasrec_epochs=1)) == 0
    before = adapter.read_bytes()
    assert any((run_dir / "adapter").glob("checkpoint-*"))
    assert main(demo_args(run_dir, tiny_model_dir, write_small_movielens(tmp_path / "b", users=44),
                          sasrec_epochs=1)) == 0
    assert adapter.read_bytes() != before


def test_demo_likelihood_ranking_reuses_training_and_reports_it(finished_demo, tiny_model_dir, caplog):
    """--decoding likelihood: only its generation and evaluation stages run; the table and the
    report show it beside the baselines, and run.yaml is still written."""
    run_dir, source = finished_demo
    caplog.set_level("INFO")
    assert main(demo_args(run_dir, tiny_model_dir, source, decoding="likelihood", prior_weight=0.5)) == 0
    ran = [r.message for r in caplog.records if r.message.endswith("] running")]
    assert ran and all("likelihood" in name for name in ran), ran
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    assert "BIGRec (likelihood)" in table and "SASRec" in table
    rows = json.loads((run_dir / "results" / "likelihood" / "test.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert "## Decoding: likelihood" in report
    share = json.loads((run_dir / "metrics" / "bigrec_likelihood.details.json").read_text())[
        "files"]["test.json"]["diagnostics"]["certified_top10_share"]
    assert share == sum(r["predict_certified"] >= min(10, len(r["predict"])) for r in rows) / len(rows)
    assert f"the top 10 is provably exact in {share:.1%} of rows" in report
    # no re-weighting (it would order only what lies below the ranked titles): the plain ranking and
    # likelihood + SASRec over both models' top titles, the weight chosen on validation
    metrics = json.loads((run_dir / "metrics" / "bigrec_likelihood.json").read_text())
    assert [name for name in metrics if "+" in name] == ["test.json +SASRec (weight by NDCG@10)"], list(metrics)
    assert not (run_dir / "metrics" / "bigrec_likelihood_fewshot_ci.json").exists()
    assert [name for name in table if name.startswith("BIGRec (likelihood) +")] == ["BIGRec (likelihood) + SASRec"]
    comparison = json.loads((run_dir / "metrics" / "comparison.json").read_text())["protocols"]
    for part in comparison.values():
        assert {"BIGRec (likelihood) + SASRec minus SASRec",
                "BIGRec (likelihood) + SASRec minus BIGRec (likelihood)"} <= set(part["paired"])
        assert "BIGRec (likelihood) + SASRec" in part["intervals"]
    inputs = {r["row"]: r for r in json.loads((run_dir / "inputs" / "test.json").read_text())}
    for r in rows:  # the default 20 titles, each once; none of the row's own history (--exclude_history)
        history = set(inputs[r["row"]]["history_item_id"])
        assert len(r["predict"]) == len(set(r["predict"])) == min(20, 25 - len(history))
        assert not {i for ids in r["predict_ids"] + r["cf_ids"] for i in ids} & history  # nor of SASRec's
        assert len(r["cf_ids"]) == len(r["cf_logp"]) == min(20, 25 - len(history))
    # likelihood alone: recommend and serve rank by it, with the prior and the history left out
    manifest = RunManifest.load(run_dir)
    assert (manifest.decoding, manifest.prior_weight, manifest.exclude_history) == ("likelihood", 0.5, True)
    assert "chosen on validation NDCG@10 (likelihood ranking " in manifest.ranking_note
    assert manifest.use_ci == manifest.ranking_note.startswith("likelihood + SASRec")
    choice = json.loads((run_dir / "metrics" / "bigrec_likelihood.details.json").read_text())["files"]["test.json"][
        "likelihood_cf"]
    assert (manifest.likelihood_cf_weight, manifest.likelihood_content_weight) == (choice["weight"],
                                                                                   choice["content_weight"])
    assert choice["content_grid"][0] == 0.0 and len(choice["content_grid"]) > 1  # the rows carry their histories
    assert f"terms kept: {', '.join(choice['terms'])}" in (run_dir / "report.md").read_text()
    from bigrec.app.recommender import Recommender

    rec = Recommender.from_run(run_dir, device="cpu")
    (result,) = rec.recommend([[0, 1, 2]], k=5, use_ci=False)
    assert result.decoding == "likelihood" and len(result.items) == 5 and not {0, 1, 2} & {i.id for i in result.items}
    # beside free decoding, the validation rows decide whether likelihood ranks the test rows: only where
    # it beats popularity there (the rows it ranked above are reused)
    caplog.clear()
    assert main(demo_args(run_dir, tiny_model_dir, source, decoding="free,likelihood", prior_weight=0.5)) == 0
    gate = json.loads((run_dir / "likelihood_gate.json").read_text())
    assert gate["kept"] == (gate["valid_ndcg10"] > gate["popularity_valid_ndcg10"]) and gate["valid_rows"] == 10
    assert gate["valid_ndcg10"] == pytest.approx(candidates_ndcg(run_dir / "results" / "likelihood" / "valid.json",
                                                                 run_dir / "data" / "id2name.txt"))
    ran = [r.message for r in caplog.records if r.message.endswith("] running")]
    assert "[likelihood_gate] running" in ran and "[generate_valid_likelihood] running" not in ran
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    report = (run_dir / "report.md").read_text()
    assert ("BIGRec (likelihood)" in table) == gate["kept"]
    assert ("Likelihood ranking was left out of the test rows" in report) != gate["kept"]
    # with the gate off, run.yaml keeps whichever validation prefers
    assert main(demo_args(run_dir, tiny_model_dir, source, decoding="free,likelihood", prior_weight=0.5,
                          likelihood_gate="false")) == 0
    manifest = RunManifest.load(run_dir)
    note = manifest.ranking_note
    assert "plain BIGRec" in note and "likelihood ranking" in note and "BIGRec + CI" in note
    found = re.findall(r"(plain BIGRec|BIGRec \+ CI \([^)]*\)|likelihood ranking|likelihood \+ SASRec \([^)]*\)) "
                       r"(\d+\.\d+)", note.split("NDCG@10 (", 1)[1])
    scores = {name: float(value) for name, value in found}
    assert len(scores) >= 4
    best = max(scores, key=scores.get)
    assert note.startswith(best) and manifest.decoding == ("likelihood" if best.startswith("likelihood") else "free")
    assert main(demo_args(run_dir, tiny_model_dir, source, decoding="free", prior_weight=0.5)) == 1
    assert main(demo_args(run_dir, tiny_model_dir, source, decoding="free,greedy")) == 1


def test_the_ranking_note_says_when_there_was_nothing_to_choose():
    """A likelihood-only run has one ranking: its note must not claim validation chose it."""
    from bigrec.evaluation.metrics import TOPK
    from bigrec.stages.demo import default_ranking

    def ndcg(at10: float) -> dict:
        return {"NDCG": [at10 if k == 10 else 0.0 for k in TOPK]}

    only = default_ranking({"likelihood": {"valid_plain": ndcg(0.0123)}})
    assert only == ("likelihood", False, None,
                    "likelihood ranking, the only ranking this run made (validation NDCG@10 0.0123)")
    free = {"valid_plain": ndcg(0.01), "CI": {"valid_single": ndcg(0.03)}}
    both = default_ranking({"free": free, "likelihood": {"valid_plain": ndcg(0.02)}})
    assert both[:3] == ("free", True, None)
    assert both[3] == ("BIGRec + CI (the paper's formula) chosen on validation NDCG@10 "
                       "(plain BIGRec 0.0100, BIGRec + CI (the paper's formula) 0.0300, likelihood ranking 0.0200)")
    # likelihood + SASRec wins when its validation NDCG@10 is best: a likelihood run that blends (use CI)
    blended = {"valid_plain": ndcg(0.02), "likelihood_cf": {"weight": 4.0, "valid_ndcg10": 0.05}}
    assert default_ranking({"free": free, "likelihood": blended}) == (
        "likelihood", True, None, "likelihood + SASRec (weight 4.0) chosen on validation NDCG@10 (plain BIGRec "
        "0.0100, BIGRec + CI (the paper's formula) 0.0300, likelihood ranking 0.0200, likelihood + SASRec "
        "(weight 4.0) 0.0500)")
    assert default_ranking({"likelihood": {**blended, "likelihood_cf": {"weight": 0.0, "valid_ndcg10": 0.02}}})[:2] \
        == ("likelihood", False)  # a tie goes to the plain ranking, found first


def test_full_data_demo_tunes_every_weight_chooses_the_epoch_on_validation_and_serves_it(tiny_model_dir, tmp_path,
                                                                                           caplog):
    """`bigrec demo --config full-data`: the timeline layout, full fine-tuning with a snapshot per
    epoch, the epoch chosen on the validation rows' likelihood NDCG@10, the test rows ranked with it
    beside the baselines, and a run.yaml that recommend answers from with the evaluated rankings."""
    from bigrec.app.recommender import Recommender

    source = write_small_movielens(tmp_path)
    run_dir = tmp_path / "run"
    small = {k: v for k, v in DEMO_SMALL.items() if k not in ("sample", "micro_batch_size", "num_epochs")}
    args = ["demo", "--config", "full-data", "--run_dir", str(run_dir), "--base_model", tiny_model_dir,
            "--source", str(source), "--num_epochs", "2", "--warmup_steps", "0", "--learning_rate", "1e-3",
            "--search_nodes", "512", *[x for k, v in small.items() for x in (f"--{k}", str(v))]]
    assert main(args) == 0
    chosen = json.loads((run_dir / "epoch.json").read_text())
    assert set(chosen["valid_ndcg10"]) == {"1", "2"} and chosen["epoch"] in (1, 2)
    best = max(chosen["valid_ndcg10"].values())
    assert chosen["valid_ndcg10"][str(chosen["epoch"])] == best
    model = run_dir / "model" / "snapshots" / f"epoch-{chosen['epoch']}"
    assert (model / "model.safetensors").is_file() and not (run_dir / "model" / "adapter_config.json").exists()
    # the chosen epoch's validation ranking is the one the evaluation reads
    assert (json.loads((run_dir / "results" / "likelihood" / "valid.json").read_text())
            == json.loads((run_dir / "results" / "epochs" / f"epoch-{chosen['epoch']}" / "valid.json").read_text()))
    table = json.loads((run_dir / "metrics" / "side_by_side.json").read_text())
    assert {"BIGRec (likelihood)", "SASRec", "SASRec (1024 examples)", "Popularity",
            "Last history title (content)"} <= set(table)
    report = (run_dir / "report.md").read_text()
    assert "every weight tuned (full fine-tuning) on all training users' timelines" in report
    assert f"epoch {chosen['epoch']} chosen on the validation rows' likelihood NDCG@10" in report

    manifest = RunManifest.load(run_dir)
    assert (manifest.base_model, manifest.adapter, manifest.layout, manifest.decoding) == (
        f"model/snapshots/epoch-{chosen['epoch']}", None, "timeline", "likelihood")
    rec = Recommender.from_run(run_dir, device="cpu")
    rows = json.loads((run_dir / "results" / "likelihood" / "test.json").read_text())
    inputs = {r["row"]: r for r in json.loads((run_dir / "inputs" / "test.json").read_text())}
    histories = [inputs[r["row"]]["history_item_id"] for r in rows]
    results = rec.recommend(histories, k=10, use_ci=False)
    for row, result in zip(rows, results, strict=True):  # 512 title tokens rank this catalogue exactly
        assert [i.id for i in result.items] == [ids[0] for ids in row["predict_ids"][:10]]
    # likelihood + SASRec: served as evaluated, with the weight validation chose, where the likelihood
    # top 20 is certified (every row here)
    from bigrec.evaluation.scores import load_scores
    from bigrec.grounding.index import load_index
    from bigrec.grounding.likelihood_cf import candidates_of, last_title_content, top_items

    details = json.loads((run_dir / "metrics" / "bigrec_likelihood.details.json").read_text())["files"]["test.json"]
    assert manifest.likelihood_cf_weight == details["likelihood_cf"]["weight"]
    assert manifest.likelihood_content_weight == details["likelihood_cf"]["content_weight"]
    items, _ = load_index(run_dir / "index.safetensors")  # the index evaluate measured the content term with
    sasrec = load_scores(run_dir / "sasrec" / "scores" / "test_5000.safetensors").align(rows)
    blended = rec.recommend(histories, k=10, use_ci=True)
    certified = [r for r in range(len(rows)) if rows[r]["predict_certified"] == len(rows[r]["predict"])]
    assert certified and all(b.use_ci and "+ SASRec" in b.ranking for b in blended)
    for r in certified:
        evaluated = top_items(candidates_of(rows[r]), sasrec[r], manifest.likelihood_cf_weight, 10,
                              rec.catalog.history_titles(histories[r]), last_title_content([histories[r]], items)[0],
                              manifest.likelihood_content_weight)
        assert [i.id for i in blended[r].items] == [i for i, _ in evaluated], r

    caplog.set_level("INFO")
    assert main(args) == 0  # a rerun reuses every stage
    assert not [r.message for r in caplog.records if r.message.endswith("] running")]
