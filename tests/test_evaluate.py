import json
import math
import re
from pathlib import Path

import pytest
import torch

from bigrec.cli import main
from bigrec.evaluation.metrics import TOPK
from bigrec.evaluation.runs import find_run
from bigrec.evaluation.scores import load_scores, save_scores
from bigrec.grounding.embedding import Grounding, embed_texts
from bigrec.grounding.index import load_index
from bigrec.grounding.reweighting import GAMMA_GRID
from bigrec.io import InputError
from bigrec.llm.models import load_model
from bigrec.stages.evaluate import Config, run

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)",
          "Sabrina (1995)", "Heat (1995)", "Mortal Kombat (1995)", "Usual Suspects, The (1995)"]
# (target id, generations): exact hits, a hit on a duplicate title, an empty top-1, near misses
TEST = [(1, ['"Heat (1995)"', '"Babe (1995)"']), (6, ['"Heat (1995)"', '"Casino"']),
        (2, ['"Casino (1995)"', '"Heat"']), (4, ['""', '"Jumanji (1995)"']),
        (5, ['"Sabrina"', '"Sabrina (1995)"']), (8, ['"The quick brown fox"', '"Usual Suspects, The (1995)"'])]
VALID = [(3, ['"Babe (1995)"', '"Heat"']), (7, ['"Mortal Kombat"', '"Babe"']), (0, ['"Toy"', '"Heat"']),
         (5, ['"Heat (1995)"', '"Sabrina"'])]


def rows_for(cases, reference=False):
    rows = []
    for i, (target, predict) in enumerate(cases):
        row = {"instruction": "Given ...", "input": "The user has watched ...", "output": f'"{TITLES[target]}"'}
        if not reference:
            row.update(user_id=100 + i, item_id=target, history_item_id=[0], row=i)
        rows.append({**row, "predict": predict})
    return rows


@pytest.fixture
def data(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "valid").mkdir()
    catalog = tmp_path / "id2name.txt"
    catalog.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(TITLES)))
    (tmp_path / "results" / "test.json").write_text(json.dumps(rows_for(TEST)))
    (tmp_path / "results" / "reference.json").write_text(json.dumps(rows_for(TEST[:3], reference=True)))
    (tmp_path / "valid" / "valid.json").write_text(json.dumps(rows_for(VALID)))
    return tmp_path


def args(data, model_dir, *extra):
    return ["evaluate", "--base_model", model_dir, "--catalog", str(data / "id2name.txt"), "--input_dir",
            str(data / "results"), "--output", str(data / "out" / "metrics.json"), "--precision", "fp32",
            *extra]


def write_reweighting_inputs(folder, train_items, test, valid):
    """``folder/train.csv`` (user i watched ``train_items[i]``) and a perfect CI model's score
    files (one-hot on each row's target) for the test and valid cases; returns the scores folder."""
    (folder / "train.csv").write_text("user_id,item_id\n" + "".join(f"{u},{i}\n" for u, i in enumerate(train_items)))
    scores = folder / "scores"
    for split, cases in (("test", test), ("valid", valid)):
        onehot = torch.zeros(len(cases), len(TITLES))
        onehot[torch.arange(len(cases)), torch.tensor([t for t, _ in cases])] = 1
        save_scores(scores / f"{split}.safetensors", onehot, range(len(cases)), [t for t, _ in cases],
                    [100 + i for i in range(len(cases))], split)
    return scores


def reference_style_metrics(model_dir, index_path, cases, scores=None, gammas=None):
    """The reference evaluate's logic: per-row argsort ranks and per-K loops.

    With ``scores`` [R, N] or [N], distances are re-weighted as the paper's scripts do, with
    ``gammas`` = {"NDCG": [g per K], "HR": [g per K]}.
    """
    model, tok = load_model(model_dir, "fp32")
    items = load_index(index_path)[0]
    ndcg, hr = [[] for _ in TOPK], [[] for _ in TOPK]

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min())

    def rank_at(dist, target):
        order = torch.argsort(dist).tolist()
        return min(order.index(i) for i, t in enumerate(TITLES) if t == TITLES[target])

    for r, (target, predict) in enumerate(cases):
        text = predict[0].strip('"')
        dist = torch.linalg.norm(items - embed_texts(model, tok, [text])[0], dim=1) if text else None
        for j, k in enumerate(TOPK):
            for key, out in (("NDCG", ndcg), ("HR", hr)):
                if dist is None:
                    rank = math.inf  # an empty generation is a miss
                elif scores is None:
                    rank = rank_at(dist, target)
                else:
                    s = scores[r] if scores.dim() == 2 else scores
                    rank = rank_at(minmax(dist.double()) * (1 + minmax(s.double())) ** -gammas[key][j], target)
                gain = (1 / math.log2(rank + 2)) if key == "NDCG" else 1.0
                out[j].append(gain if rank < k else 0.0)
    return {"NDCG": [math.fsum(v) / len(cases) for v in ndcg], "HR": [math.fsum(v) / len(cases) for v in hr]}


def test_evaluate_end_to_end(data, tiny_model_dir, capsys):
    assert main(args(data, tiny_model_dir)) == 0
    out = data / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["topk", "reference.json", "test.json"]
    assert metrics["topk"] == list(TOPK)
    index = next(out.glob("index.*.safetensors"))
    assert metrics["test.json"] == reference_style_metrics(tiny_model_dir, index, TEST)
    assert metrics["test.json"]["HR"][0] == pytest.approx(3 / 6)  # exact titles, the duplicate id included
    assert metrics["reference.json"]["HR"][0] == 1.0  # reference rows: targets found by title
    assert (out / "metrics.png").stat().st_size > 1000
    details = json.loads((out / "metrics.details.json").read_text())
    diag = details["files"]["test.json"]["diagnostics"]
    assert diag["empty_top1"] == 1 and diag["rows"] == 6
    assert diag["distinct_top1_share"] == pytest.approx(4 / 6)  # Heat x2, Casino, Sabrina, fox
    assert diag["exact_title_top1_share"] == pytest.approx(3 / 6)
    assert diag["most_frequent_top1"][0] == ["Heat (1995)", 2]
    assert "NDCG@10" in capsys.readouterr().out
    assert (out / "metrics.config.yaml").is_file()

    # every beam: the best rank per row; the empty and near-miss rows hit through their second beam
    assert main(args(data, tiny_model_dir, "--all_beams", "--output", str(out / "beams.json"))) == 0
    beams = json.loads((out / "beams.json").read_text())
    assert beams["test.json"]["HR"][0] == 1.0
    assert len(list(out.glob("index.*.safetensors"))) == 1  # the index was reused


def test_validation_results_are_evaluated_without_reweighting(data, tiny_model_dir):
    """--valid_input_dir alone: the validation rows' plain metrics (what the demo's run.yaml is chosen
    on) equal those of evaluating them as a test file, and nothing is re-weighted."""
    (data / "results" / "reference.json").unlink()
    metrics = run(Config(base_model=tiny_model_dir, catalog=str(data / "id2name.txt"),
                         input_dir=str(data / "results"), valid_input_dir=str(data / "valid"),
                         output=str(data / "out" / "metrics.json"), precision="fp32"))
    assert list(metrics) == ["topk", "test.json"]
    details = json.loads((data / "out" / "metrics.details.json").read_text())["files"]["test.json"]
    assert details["valid_file"].endswith("valid.json")
    as_test = run(Config(base_model=tiny_model_dir, catalog=str(data / "id2name.txt"),
                         input_dir=str(data / "valid"), output=str(data / "out" / "valid_metrics.json"),
                         precision="fp32"))
    assert details["valid_plain"] == as_test["valid.json"]
    assert details["valid_plain"]["HR"][0] == pytest.approx(2 / 4)  # "Babe (1995)", and "Mortal Kombat" nearest its title


def test_certified_share_counts_rows_whose_top10_is_exact():
    from bigrec.evaluation.results import certified_share

    rows = [{"predict": ["t"] * 20, "predict_certified": 20}, {"predict": ["t"] * 20, "predict_certified": 9},
            {"predict": ["t"] * 3, "predict_certified": 3}, {"predict": ["t"] * 20, "predict_certified": 10}]
    assert certified_share(rows) == 3 / 4  # a ranking shorter than 10 counts when all of it is exact
    assert certified_share([{"predict": ["t"]}]) is None  # not a likelihood ranking


def test_grounding_options(data, tiny_model_dir):
    """Mean pooling of a middle layer over natural titles: its own index, and a generation in
    natural order ("The Usual Suspects") grounds to the catalogue's "Usual Suspects, The"."""
    cases = TEST + [(8, ['"The Usual Suspects (1995)"', '"Heat"'])]
    (data / "results" / "test.json").write_text(json.dumps(rows_for(cases)))
    (data / "results" / "reference.json").unlink()
    out = data / "out"
    assert main(args(data, tiny_model_dir, "--pooling", "mean", "--embed_layer", "1", "--title_text", "natural")) == 0
    details = json.loads((out / "metrics.details.json").read_text())
    assert details["grounding"] == "layer 1, mean over tokens, natural titles"
    assert Path(details["index"]).name.endswith(".mean-1-natural.safetensors")
    assert load_index(details["index"])[1]["pooling"] == "mean"
    model, tok = load_model(tiny_model_dir, "fp32")
    items = load_index(details["index"])[0]
    query = embed_texts(model, tok, ["The Usual Suspects (1995)"], grounding=Grounding("mean", 1, "natural"))
    assert torch.linalg.norm(items - query, dim=1).argmin().item() == 8
    metrics = json.loads((out / "metrics.json").read_text())["test.json"]
    assert metrics["HR"][0] >= 4 / 7  # the 3 exact titles and "The Usual Suspects"

    # the reference grounding is another index beside it
    assert main(args(data, tiny_model_dir, "--output", str(out / "reference.json"))) == 0
    assert len(list(out.glob("index.*.safetensors"))) == 2


def test_index_of_another_model_is_refused(data, tiny_model_dir, tiny_qwen_dir, capsys):
    index = str(data / "index.safetensors")
    assert main(args(data, tiny_model_dir, "--index_path", index)) == 0
    (data / "out" / "metrics.json").unlink()
    assert main(args(data, tiny_qwen_dir, "--index_path", index)) == 1
    assert "made by another base model" in capsys.readouterr().err
    assert not (data / "out" / "metrics.json").exists()


def test_reweighting_with_popularity_and_ci(data, tiny_model_dir):
    (data / "results" / "reference.json").unlink()
    scores = write_reweighting_inputs(data, [1, 1, 1, 2, 3, 5, 5], TEST, VALID)
    metrics = run(Config(base_model=tiny_model_dir, catalog=str(data / "id2name.txt"),
                         input_dir=str(data / "results"), valid_input_dir=str(data / "valid"),
                         popularity=str(data / "train.csv"), ci_scores=str(scores),
                         output=str(data / "out" / "metrics.json"), precision="fp32"))
    plain, tuned = metrics["test.json"], metrics["test.json +CI (gamma per metric@K)"]
    # with its score, each target beats every item but the nearest; the empty row stays a miss
    assert tuned["HR"][TOPK.index(3)] == pytest.approx(5 / 6)
    assert all(t >= p - 1e-12 for t, p in zip(tuned["HR"], plain["HR"], strict=True))
    details = json.loads((data / "out" / "metrics.details.json").read_text())["files"]["test.json"]
    # the weighted-sum variant lets the perfect CI model outrank the nearest item: every non-empty row a hit
    blend = metrics["test.json +CI blend (weight by NDCG@10)"]
    assert blend["HR"][0] == pytest.approx(5 / 6) and details["CI"]["blend"]["weight"] > 0
    # every ranking is described by fields, and found by them rather than by its label
    assert set(details["runs"]) == set(details["ranks"]) | {"test.json +CI (gamma per metric@K)",
                                                            "test.json +popularity (gamma per metric@K)"}
    assert set(details["runs"]) == set(metrics) - {"topk"}
    assert find_run(details, ranking="blend", weights="CI") == "test.json +CI blend (weight by NDCG@10)"
    assert find_run(details, ranking="reweighted", weights="popularity", chosen_by="NDCG", k=10) == \
        "test.json +popularity (gamma by NDCG@10)"
    assert find_run(details, ranking="likelihood_cf") is None
    assert tuned["HR"][0] < 5 / 6  # the paper's formula keeps the nearest item first
    assert len(details["valid_plain"]["NDCG"]) == len(TOPK)
    assert details["CI"]["ci_scores"].endswith("test.safetensors")
    assert details["CI"]["valid_ci_scores"].endswith("valid.safetensors")
    index = next((data / "out").glob("index.*.safetensors"))
    popularity = torch.tensor([0, 3, 1, 1, 0, 2, 0, 0, 0], dtype=torch.float64)
    ci = load_scores(scores / "test.safetensors").scores
    for kind, weights in (("CI", ci), ("popularity", popularity)):
        gammas = details[kind]["gammas"]
        assert len(gammas["NDCG"]) == len(TOPK) and gammas["single"] in GAMMA_GRID
        expected = reference_style_metrics(tiny_model_dir, index, TEST, weights, gammas)
        for key in ("NDCG", "HR"):
            assert metrics[f"test.json +{kind} (gamma per metric@K)"][key] == pytest.approx(expected[key])
        single = {key: [gammas["single"]] * len(TOPK) for key in ("NDCG", "HR")}
        expected = reference_style_metrics(tiny_model_dir, index, TEST, weights, single)
        for key in ("NDCG", "HR"):
            assert metrics[f"test.json +{kind} (gamma by NDCG@10)"][key] == pytest.approx(expected[key])


def write(path, rows):
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize("case, message", [
    ("no_predict", r"test.json, row 1: no 'predict' field"),
    ("bad_predict", r"test.json, row 0: field 'predict' must be a non-empty list of strings"),
    ("unknown_title", r"reference.json: no row has a target in .*row 0: target title '\"Nope\"' is not in"),
    ("empty_file", r"test.json: no result rows"),
    ("no_valid", "need --valid_input_dir"),
    ("misaligned_ci", r"no score matrix in .* matches the rows of"),
])
def test_bad_input(data, tiny_model_dir, capsys, case, message):
    rows = rows_for(TEST)
    extra = []
    if case == "no_predict":
        del rows[1]["predict"]
    elif case == "bad_predict":
        rows[0]["predict"] = '"Heat (1995)"'
    elif case == "unknown_title":
        write(data / "results" / "reference.json", [{"instruction": "x", "output": '"Nope"', "predict": ["a"]}])
    elif case == "empty_file":
        rows = []
    elif case == "no_valid":
        extra = ["--popularity", str(data / "train.csv")]
    elif case == "misaligned_ci":
        save_scores(data / "ci.safetensors", torch.zeros(2, len(TITLES)), [0, 1], [0, 0], [100, 101], "test")
        extra = ["--ci_scores", str(data / "ci.safetensors"), "--valid_input_dir", str(data / "valid")]
    write(data / "results" / "test.json", rows)
    assert main(args(data, tiny_model_dir, *extra)) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (data / "out").exists() or not list((data / "out").iterdir())  # nothing half-written



def test_unknown_targets_are_counted_and_skipped(data, tiny_model_dir):
    rows = rows_for(TEST[:3], reference=True)
    write(data / "results" / "reference.json", [*rows, {"instruction": "x", "output": '"Nope"', "predict": ["a"]}])
    assert main(args(data, tiny_model_dir)) == 0
    out = data / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "metrics.details.json").read_text())
    assert details["files"]["reference.json"]["diagnostics"]["unknown_targets_skipped"] == 1
    assert details["files"]["reference.json"]["diagnostics"]["rows"] == 3
    assert details["files"]["test.json"]["diagnostics"]["unknown_targets_skipped"] == 0
    # The three known rows are the first three rows of test.json: same predictions, same metrics.
    write(data / "results" / "test.json", rows_for(TEST[:3]))
    assert main(args(data, tiny_model_dir)) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert metrics["reference.json"] == again["test.json"]


# Constrained decoding: (target id, item ids of each beam); the beams' texts are their titles.
CTEST = [(4, [[1, 6], [4]]), (1, [[1, 6], [3]]), (0, [[2], [7]]), (8, [[5], [8]])]
CVALID = [(3, [[3], [0]]), (7, [[0], [2]]), (0, [[1, 6], [5]]), (5, [[4], [5]])]


def constrained_rows(cases):
    rows = rows_for([(t, [f'"{TITLES[ids[0]]}"' for ids in beams]) for t, beams in cases])
    for row, (_, beams) in zip(rows, cases, strict=True):
        row["predict_ids"] = beams
        row["predict_scores"] = [-1.0 - i for i in range(len(beams))]
    return rows


@pytest.fixture
def cdata(data):
    for folder, cases in (("cresults", CTEST), ("cvalid", CVALID)):
        (data / folder).mkdir()
        write(data / folder / f"{folder}.json", constrained_rows(cases))
    return data


def expected_constrained_ranks(index_path, cases, scores=None, gamma=None):
    """Brute force: distances to the top beam's title (its index row), re-weighted, beams first."""
    from bigrec.evaluation.metrics import target_id_lists, target_ranks
    from bigrec.grounding.ranking import l2_distances, rank_with_beams
    from bigrec.grounding.reweighting import reweight

    items = load_index(index_path)[0]
    dist = l2_distances(items[[beams[0][0] for _, beams in cases]], items)
    if scores is not None:
        dist = reweight(dist, scores, gamma)
    first = [[i for ids in beams for i in ids] for _, beams in cases]
    targets = target_id_lists([t for t, _ in cases], TITLES)
    return target_ranks(rank_with_beams(first, dist), targets)


def test_constrained_results_rank_their_beams_first(cdata, tiny_model_dir):
    out = cdata / "out"
    assert main(args(cdata, tiny_model_dir, "--input_dir", str(cdata / "cresults"))) == 0
    metrics = json.loads((out / "metrics.json").read_text())["cresults.json"]
    index = next(out.glob("index.*.safetensors"))
    ranks = expected_constrained_ranks(index, CTEST)
    # By hand: row 0 ranks Heat's two ids, then its target (beam 2); row 1's target is beam 1; row 3's is beam 2.
    assert ranks[[0, 1, 3]].tolist() == [2, 0, 1]
    assert ranks.better[2] >= 2  # two beam items ahead of a target no beam named
    from bigrec.evaluation.metrics import ndcg_hr

    expected = ndcg_hr(ranks, TOPK)
    for key in ("NDCG", "HR"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["HR"][0] == pytest.approx(1 / 4) and metrics["HR"][TOPK.index(3)] >= 3 / 4
    details = json.loads((out / "metrics.details.json").read_text())["files"]["cresults.json"]
    assert details["diagnostics"]["decoding"] == "constrained"
    assert details["diagnostics"]["exact_title_top1_share"] == 1.0

    # --all_beams changes nothing for rows that already rank every beam
    assert main(args(cdata, tiny_model_dir, "--input_dir", str(cdata / "cresults"), "--all_beams",
                     "--output", str(out / "beams.json"))) == 0
    assert json.loads((out / "beams.json").read_text())["cresults.json"] == metrics


def test_constrained_results_with_reweighting(cdata, tiny_model_dir):
    scores = write_reweighting_inputs(cdata, [1, 1, 1, 2, 3, 5, 5, 0], CTEST, CVALID)
    metrics = run(Config(base_model=tiny_model_dir, catalog=str(cdata / "id2name.txt"),
                         input_dir=str(cdata / "cresults"), valid_input_dir=str(cdata / "cvalid"),
                         popularity=str(cdata / "train.csv"), ci_scores=str(scores),
                         output=str(cdata / "out" / "metrics.json"), precision="fp32"))
    from bigrec.evaluation.metrics import ndcg_hr

    details = json.loads((cdata / "out" / "metrics.details.json").read_text())["files"]["cresults.json"]
    index = next((cdata / "out").glob("index.*.safetensors"))
    popularity = torch.tensor([1, 3, 1, 1, 0, 2, 0, 0, 0], dtype=torch.float64)
    ci = load_scores(scores / "test.safetensors").scores
    for kind, weights in (("CI", ci), ("popularity", popularity)):
        gammas = details[kind]["gammas"]
        single = expected_constrained_ranks(index, CTEST, weights.double(), gammas["single"])
        got, expected = metrics[f"cresults.json +{kind} (gamma by NDCG@10)"], ndcg_hr(single, TOPK)
        for key in ("NDCG", "HR"):
            assert got[key] == pytest.approx(expected[key])
        tuned = metrics[f"cresults.json +{kind} (gamma per metric@K)"]
        for j in range(len(TOPK)):
            for key in ("NDCG", "HR"):
                ranks = expected_constrained_ranks(index, CTEST, weights.double(), gammas[key][j])
                assert tuned[key][j] == pytest.approx(ndcg_hr(ranks, TOPK)[key][j])
    # with a perfect CI score, a target no beam named comes right after the beams: row 2 at rank 2
    assert metrics["cresults.json +CI (gamma per metric@K)"]["HR"][TOPK.index(3)] == 1.0


@pytest.mark.parametrize("ids, message", [
    ([[1]], "must be a list of 2 non-empty lists"),
    ([[1], []], "must be a list of 2 non-empty lists"),
    ([[1], [99]], "outside the catalogue"),
])
def test_bad_predict_ids(cdata, tiny_model_dir, capsys, ids, message):
    rows = constrained_rows(CTEST)
    rows[1]["predict_ids"] = ids
    write(cdata / "cresults" / "cresults.json", rows)
    assert main(args(cdata, tiny_model_dir, "--input_dir", str(cdata / "cresults"))) == 1
    assert re.search(rf"cresults.json, row 1: .*{message}", capsys.readouterr().err)


def test_seen_items_content_baseline_intervals_and_paired_comparison(data, tiny_model_dir, capsys):
    """--exclude_history, --last_title and --compare on known rows, checked against brute force."""
    (data / "results" / "reference.json").unlink()
    histories = [[0, 3], [1], [4], [4, 7], [0], [7, 3]]  # row 1 holds Heat (id 1), its target's title
    rows = rows_for(TEST)
    for row, history in zip(rows, histories, strict=True):
        row["history_item_id"] = history
    write(data / "results" / "test.json", rows)
    scores = write_reweighting_inputs(data, [1, 2], TEST, VALID)  # a perfect model: every target first
    out = data / "out"
    for name, extra in (("plain", ()), ("unseen", ("--exclude_history",))):
        assert main(args(data, tiny_model_dir, "--output", str(out / f"{name}.json"), "--last_title",
                         "--compare", str(scores / "test.safetensors"), *extra)) == 0
    printed = capsys.readouterr().out
    assert "HR@10 [95% CI]" in printed and "minus test.safetensors" in printed
    assert main(args(data, tiny_model_dir, "--output", str(out / "page.json"), "--last_title", "--report")) == 0
    page = (out / "page.html").read_text()
    assert "test.json last history title" in page and "data:image/png;base64," in page and "history_copy" in page
    plain = json.loads((out / "plain.details.json").read_text())["files"]["test.json"]
    unseen = json.loads((out / "unseen.details.json").read_text())["files"]["test.json"]
    assert plain["diagnostics"]["history_copy_top1_share"] == pytest.approx(1 / 6)  # "Heat (1995)" in row 1
    assert plain["rows"] == list(range(6))

    model, tok = load_model(tiny_model_dir, "fp32")
    items = load_index(next(out.glob("index.*.safetensors")))[0]
    for r, ((target, predict), history) in enumerate(zip(TEST, histories, strict=True)):
        same = [i for i, t in enumerate(TITLES) if t == TITLES[target]]
        queries = {"test.json last history title": items[history[-1]]}
        if predict[0] != '""':
            queries["test.json"] = embed_texts(model, tok, [predict[0].strip('"')])[0]
        for name, query in queries.items():
            dist = torch.linalg.norm(items - query, dim=1)
            best = dist[same].min()
            seen = [i for i in history if i not in same]
            assert plain["ranks"][name][r] == int((dist < best).sum())
            assert unseen["ranks"][name][r] == int((dist < best).sum()) - sum(bool(dist[i] < best) for i in seen)
        if predict[0] == '""':
            assert plain["ranks"]["test.json"][r] >= len(TITLES)  # an empty generation is a miss
    assert unseen["ranks"]["test.json last history title"] != plain["ranks"]["test.json last history title"]
    # Heat's two ids lie at one distance: for a Heat target they are one answer, never a tie
    assert plain["tied"] == {name: [0] * len(TEST) for name in plain["ranks"]}
    assert plain["tied_targets"] == {name: 0 for name in plain["ranks"]}
    assert "Targets tied with other items, of 6 rows" in printed and "Targets tied with other items" in page

    metrics = json.loads((out / "plain.json").read_text())
    for name, iv in plain["intervals"].items():
        for key in ("NDCG", "HR"):
            for value, (lo, hi) in zip(metrics[name][key], iv["ci"][key], strict=True):
                assert lo - 1e-12 <= value <= hi + 1e-12
            # against a model that ranks every target first: the difference is the metric minus 1
            assert iv["paired"][key]["diff"] == pytest.approx([v - 1 for v in metrics[name][key]])
    assert plain["compare"]["ci"]["HR"][0] == [1.0, 1.0]


def test_history_options_need_history_ids(data, tiny_model_dir, capsys):
    assert main(args(data, tiny_model_dir, "--exclude_history")) == 1  # reference.json rows carry none
    assert "reference.json: --exclude_history needs 'history_item_id'" in capsys.readouterr().err
    assert not (data / "out" / "metrics.json").exists()


def test_ground_beams_ranks_by_the_nearest_beam(data, tiny_model_dir):
    """Every row's second beam is its target's exact title, or its first already is: grounding the
    nearest of two beams puts each target first, ahead of items near the first beam."""
    (data / "results" / "reference.json").unlink()
    out = data / "out"
    assert main(args(data, tiny_model_dir, "--ground_beams", "2")) == 0
    metrics = json.loads((out / "metrics.json").read_text())["test.json"]
    assert metrics["HR"][0] == 1.0  # the empty top-1 row too: its second beam is "Jumanji (1995)"
    details = json.loads((out / "metrics.details.json").read_text())
    assert details["ground_beams"] == 2 and details["files"]["test.json"]["diagnostics"]["empty_top1"] == 1
    assert main(args(data, tiny_model_dir, "--output", str(out / "one.json"))) == 0
    assert json.loads((out / "one.json").read_text())["test.json"]["HR"][0] == pytest.approx(3 / 6)


def test_nearest_beam_distances_by_hand():
    from bigrec.grounding.ranking import nearest_beam_distances

    items = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    vectors = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([3.0, 0.0]), "c": torch.tensor([0.0, 3.0])}

    def embed(texts):
        return torch.stack([vectors[t] if t else torch.zeros(2) for t in texts])

    dist, empty = nearest_beam_distances([["a", "b"], ["c", ""], ["", ""]], items, embed, 2)
    assert empty.tolist() == [False, False, True]
    assert dist[0].tolist() == pytest.approx([0.0, 1e-6 * 5.0, 4.0], abs=1e-9)  # item 1 is beam b's title
    assert dist[0, 0] < dist[0, 1]  # two exact titles rank in beam order
    assert dist[1].tolist() == pytest.approx([3.0, math.sqrt(18), 1.0])  # the empty second beam is ignored


def test_a_runaway_generation_is_cut_before_it_is_embedded(data, tiny_model_dir, caplog):
    (data / "results" / "reference.json").unlink()
    rows = rows_for(TEST)
    rows[5]["predict"] = ['"' + "Heat " * 40_000 + '"', '"Heat"']  # 200,000 characters
    write(data / "results" / "test.json", rows)
    caplog.set_level("WARNING", logger="bigrec.stages.evaluate")
    assert main(args(data, tiny_model_dir)) == 0
    assert "1 rows hold a generation longer than 1000 characters" in caplog.text


def likelihood_rows(cases, cf_logp=-5.0):
    """Likelihood-ranked rows: the cases' titles at log-probabilities -1, -2, ..., and SASRec's one
    candidate, the target's title, at ``cf_logp``."""
    rows = constrained_rows(cases)
    for row, (target, _) in zip(rows, cases, strict=True):
        row["cf_ids"] = [[i for i, t in enumerate(TITLES) if t == TITLES[target]]]
        row["cf_logp"] = [cf_logp]
    return rows


def test_likelihood_with_sasrec_candidates_chooses_the_weight_on_validation(cdata, tiny_model_dir):
    """A perfect SASRec (one-hot on the target): on validation a target the LM named second needs
    w > 1, one only SASRec named (log p -5 against the LM's best -1) w > 4 (a tie at 4): w = 8 is the
    smallest weight that puts every target first, and the test rows are ranked with it."""
    from bigrec.evaluation.metrics import ndcg_hr, target_id_lists
    from bigrec.grounding.likelihood_cf import WEIGHT_GRID, blend_ranks, candidates_of

    for folder, cases in (("cresults", CTEST), ("cvalid", CVALID)):
        write(cdata / folder / f"{folder}.json", likelihood_rows(cases))
    scores = write_reweighting_inputs(cdata, [1], CTEST, CVALID)
    metrics = run(Config(base_model=tiny_model_dir, catalog=str(cdata / "id2name.txt"),
                         input_dir=str(cdata / "cresults"), valid_input_dir=str(cdata / "cvalid"),
                         cf_scores=str(scores / "test.safetensors"), output=str(cdata / "out" / "metrics.json"),
                         precision="fp32"))
    name = "cresults.json +SASRec (weight by NDCG@10)"
    details = json.loads((cdata / "out" / "metrics.details.json").read_text())["files"]["cresults.json"]
    choice = details["likelihood_cf"]
    assert choice["weight"] == 8.0 and choice["valid_ndcg10"] == 1.0 and choice["grid"] == list(WEIGHT_GRID)
    assert choice["valid_cf_scores"].endswith("valid.safetensors")
    assert choice["valid_grid_ndcg10"][:WEIGHT_GRID.index(8.0)] == sorted(choice["valid_grid_ndcg10"][:5])
    assert max(choice["valid_grid_ndcg10"][:WEIGHT_GRID.index(8.0)]) < 1.0
    assert metrics[name]["NDCG"] == [1.0] * len(TOPK) and details["ranks"][name] == [0.0] * 4
    # the plain ranking is untouched: a target no list named lies past the LM's titles
    assert metrics["cresults.json"]["HR"][0] == pytest.approx(1 / 4)
    rows = likelihood_rows(CTEST)
    expected = blend_ranks([candidates_of(r) for r in rows], load_scores(scores / "test.safetensors").scores,
                           target_id_lists([t for t, _ in CTEST], TITLES), [0.0])[0]
    assert expected.tolist() == [2.0, 0.0, 2.0, 1.0]  # w = 0: SASRec's title after the LM's (Heat: 2 ids)
    assert ndcg_hr(expected, TOPK)["NDCG"][0] == pytest.approx(1 / 4)

    # rows without SASRec's candidates evaluate as before; a validation file without them is refused
    write(cdata / "cvalid" / "cvalid.json", constrained_rows(CVALID))
    with pytest.raises(InputError, match="carry no SASRec candidates"):
        run(Config(base_model=tiny_model_dir, catalog=str(cdata / "id2name.txt"), input_dir=str(cdata / "cresults"),
                   valid_input_dir=str(cdata / "cvalid"), cf_scores=str(scores),
                   output=str(cdata / "out" / "m2.json"), precision="fp32"))
    write(cdata / "cresults" / "cresults.json", [*likelihood_rows(CTEST[:2]), *constrained_rows(CTEST[2:])])
    with pytest.raises(InputError, match="some rows carry SASRec's candidates"):
        run(Config(base_model=tiny_model_dir, catalog=str(cdata / "id2name.txt"), input_dir=str(cdata / "cresults"),
                   valid_input_dir=str(cdata / "cvalid"), cf_scores=str(scores),
                   output=str(cdata / "out" / "m3.json"), precision="fp32"))
    write(cdata / "cresults" / "cresults.json", constrained_rows(CTEST))
    plain = run(Config(base_model=tiny_model_dir, catalog=str(cdata / "id2name.txt"),
                       input_dir=str(cdata / "cresults"), valid_input_dir=str(cdata / "cvalid"), cf_scores=str(scores),
                       output=str(cdata / "out" / "m4.json"), precision="fp32"))
    assert name not in plain and plain["cresults.json"] == metrics["cresults.json"]
