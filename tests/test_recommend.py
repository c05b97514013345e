"""Recommender core and ``bigrec recommend`` on a complete tiny run folder (tests/run_fixture.py)."""

from __future__ import annotations

import json

import pytest
import torch

from bigrec.app.recommender import HistoryError, Query, Recommender
from bigrec.app.run_manifest import RunManifest
from bigrec.baselines.data import read_split
from bigrec.cli import main
from bigrec.grounding.embedding import embed_texts
from bigrec.grounding.index import IndexMismatchError, load_index
from bigrec.grounding.ranking import l2_distances
from bigrec.grounding.reweighting import reweight
from bigrec.llm.defaults import DECODINGS
from bigrec.llm.models import load_model
from run_fixture import TAUGHT, TITLES, tiny_run

CASINO, JUMANJI, HEAT, HEAT_TWIN = 6, 8, 5, 19  # ids in the fixture catalogue (Heat is there twice)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def rec(run_dir):
    return Recommender.from_run(run_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(run_dir):
    """The base model and the index file, loaded independently of the recommender."""
    model, tok = load_model(str(run_dir / "base"), "fp32", device="cpu")
    items, _ = load_index(run_dir / "index.safetensors")
    return model, tok, items


def sibling_run(run_dir, tmp_path, **changes):
    """Another run folder reusing the fixture's parts (paths relative to the new folder)."""
    manifest = RunManifest.load(run_dir)
    up = f"../{run_dir.name}"
    values = dict(base_model=f"{up}/base", catalog=f"{up}/data/id2name.txt", index=f"{up}/index.safetensors",
                  data=f"{up}/data", adapter=f"{up}/adapter", sasrec=f"{up}/sasrec")
    values.update(changes)
    for key, value in values.items():
        setattr(manifest, key, value)
    out = run_dir.parent / tmp_path.name
    out.mkdir()
    manifest.save(out)
    return out


def test_ids_and_titles_give_the_taught_answer(rec, reference):
    (history, answer), (history2, answer2) = TAUGHT
    ids = [TITLES.index(t) for t in history]
    by_id, by_title, other = rec.recommend([ids, history, history2], k=5)
    assert [m.how for m in by_id.history] == ["id", "id"] and [m.how for m in by_title.history] == ["title", "title"]
    assert [m.id for m in by_id.history] == [m.id for m in by_title.history] == ids
    # Step 1: the adapter's taught answer, per history; step 2: grounded onto that very item.
    assert by_id.generated[0] == by_title.generated[0] == f'"{answer}"' and len(by_id.generated) == 2
    assert other.generated[0] == f'"{answer2}"'
    assert by_title.grounded == answer == "Casino (1995)"
    assert by_title.items[0].id == CASINO and by_title.items[0].distance < 1e-4
    assert other.items[0].id == JUMANJI and other.items[0].title == "Jumanji (1995)"
    assert [(i.id, i.title) for i in by_id.items] == [(i.id, i.title) for i in by_title.items]
    # The distances are the L2 distances between base-model embeddings of the text and every title.
    model, tok, items = reference
    dist = l2_distances(embed_texts(model, tok, [by_title.grounded]), items)[0]
    expected = torch.argsort(dist, stable=True)[:5].tolist()
    assert [i.id for i in by_title.items] == expected
    assert [i.distance for i in by_title.items] == pytest.approx(dist[expected].tolist(), abs=1e-5)
    assert [i.score for i in by_title.items] == [i.distance for i in by_title.items]
    assert all(i.title == TITLES[i.id] for i in by_title.items)


def test_unknown_titles_are_matched_and_reported(rec, reference):
    (result,) = rec.recommend([["toy story (1995)", ' "Heat (1995)" ', "Heet (1995)", "Braveheart"]], k=3)
    how = [(m.given, m.how, m.id) for m in result.history]
    assert how[0] == ("toy story (1995)", "case", 0)
    assert how[1] == (' "Heat (1995)" ', "title", HEAT)  # normalised exactly; duplicate title -> first id
    model, tok, items = reference
    dist = l2_distances(embed_texts(model, tok, ["Heet (1995)", "Braveheart"]), items)
    for match, row in zip(result.history[2:], dist, strict=True):
        assert match.how == "nearest"
        assert match.id == int(row.argmin()) and match.title == TITLES[match.id]
        assert match.distance == pytest.approx(float(row.min()), abs=1e-5)


def test_exclude_history_and_k(rec):
    (plain,) = rec.recommend([["Heat (1995)", "Babe (1995)"]], k=len(TITLES) + 5)
    assert len(plain.items) == len(TITLES)  # k beyond the catalogue gives the whole ranking
    assert sorted(i.id for i in plain.items) == list(range(len(TITLES)))
    scores = [i.score for i in plain.items]
    assert scores == sorted(scores)
    (excl,) = rec.recommend([["Heat (1995)", "Babe (1995)"]], k=len(TITLES), exclude_history=True)
    assert {i.id for i in excl.items} == set(range(len(TITLES))) - {HEAT, HEAT_TWIN, 7}  # both Heat ids go


def test_batch_with_mixed_options(rec):
    queries = [Query(["Heat (1995)"], k=2), Query([0, 5], k=4, use_ci=True), Query(["Babe (1995)"], k=1)]
    results = rec.recommend_queries(queries)
    assert [len(r.items) for r in results] == [2, 4, 1]
    assert [r.use_ci for r in results] == [False, True, False]
    assert all(r.timing["batch"] == 3 for r in results)


def test_use_ci_reweights_with_sasrec(rec, run_dir):
    from bigrec.baselines.sasrec import SASRec

    history = [0, 5, 7]
    (plain,) = rec.recommend([history], k=len(TITLES))
    (ci,) = rec.recommend([history], k=len(TITLES), use_ci=True)
    assert ci.use_ci and ci.generated == plain.generated
    dist = torch.tensor([next(i.distance for i in plain.items if i.id == j) for j in range(len(TITLES))])
    sasrec = SASRec.from_dir(run_dir / "sasrec")
    expected = reweight(dist[None], sasrec.score([history]), RunManifest.load(run_dir).ci_gamma)[0]
    assert [i.id for i in ci.items] == torch.argsort(expected, stable=True).tolist()
    assert [i.score for i in ci.items] == pytest.approx(expected[[i.id for i in ci.items]].tolist(), abs=1e-5)
    assert {i.id: i.distance for i in ci.items} == pytest.approx({i.id: i.distance for i in plain.items})


@pytest.mark.parametrize("history, field, text", [
    ([], "history", "empty"),
    ([0, 20], "history[1]", "item id 20 is not in the catalogue (ids 0..19)"),
    ([-1], "history[0]", "not in the catalogue"),
    (["Heat (1995)", True], "history[1]", "expected a catalogue id"),
    ([" "], "history[0]", "empty title"),
    ([1.5], "history[0]", "expected a catalogue id"),
])
def test_bad_histories(rec, history, field, text):
    with pytest.raises(HistoryError) as info:
        rec.recommend([history])
    assert info.value.field == field and text in str(info.value)


def test_k_must_be_positive(rec):
    with pytest.raises(ValueError, match="k must be at least 1"):
        rec.recommend([[0]], k=0)


def test_run_without_sasrec_refuses_use_ci(run_dir, tmp_path):
    other = Recommender.from_run(sibling_run(run_dir, tmp_path, sasrec=None), device="cpu")
    assert not other.has_ci and other.sasrec is None
    assert other.recommend([[0, 5]], k=2)[0].items[0].id == CASINO
    with pytest.raises(ValueError, match="use_ci: this run has no SASRec model"):
        other.recommend([[0, 5]], use_ci=True)


def test_run_without_ci_gamma_refuses_use_ci(run_dir, tmp_path):
    other = Recommender.from_run(sibling_run(run_dir, tmp_path, ci_gamma=None, use_ci=False), device="cpu")
    assert other.sasrec is not None and not other.has_ci and "ci_gamma" in other.ci_unavailable
    with pytest.raises(ValueError, match=r"use_ci: this run has no ci_gamma in run.yaml .*\(" + str(other.run_dir)):
        other.recommend([[0, 5]], use_ci=True)


def test_index_of_another_precision_is_refused(run_dir, tmp_path):
    with pytest.raises(IndexMismatchError, match="float32"):
        Recommender.from_run(sibling_run(run_dir, tmp_path, precision="bf16"), device="cpu")


def test_a_run_folder_that_does_not_fit_is_one_input_error_line(run_dir, tmp_path, capsys):
    """Another precision than its index's, or use_ci where the run has no SASRec: the run folder's
    fault, printed as one line naming it, not as an internal error."""
    bf16 = sibling_run(run_dir, tmp_path / f"{tmp_path.name}-bf16", precision="bf16")
    assert main(["recommend", "--run", str(bf16), "--history", "0"]) == 1
    err = capsys.readouterr().err  # the lines before the last are the loading's progress bars
    last = err.strip().splitlines()[-1]
    assert "internal error" not in err and last.startswith(f"bigrec recommend: error: {run_dir}/index.safetensors: "
                                                           "embedded in float32, but this run uses bfloat16"), err
    plain = sibling_run(run_dir, tmp_path / f"{tmp_path.name}-plain", sasrec=None)
    assert main(["recommend", "--run", str(plain), "--history", "0", "--use_ci"]) == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and err.strip().splitlines()[-1] == (
        f"bigrec recommend: error: use_ci: this run has no SASRec model to re-weight with (run.yaml: sasrec is "
        f"unset) ({plain})")


def test_search(rec):
    assert rec.search("heat") == [(HEAT, "Heat (1995)"), (HEAT_TWIN, "Heat (1995)")]
    assert [t for _, t in rec.search("  SEVEN ")] == ["Seven (Se7en) (1995)"]
    assert [i for i, _ in rec.search("man")] == [8, 14, 16]  # Jumanji, Batman Forever, Dead Man Walking
    assert [i for i, _ in rec.search("b")] == [7, 12, 14, 9, 10]  # titles starting with "b" first, then by id
    assert [i for i, _ in rec.search("b", limit=2)] == [7, 12]
    assert rec.search("zzz") == [] and rec.search("   ") == []


def test_history_flag_keeps_commas_and_k_alias():
    from bigrec.config import parse
    from bigrec.stages.recommend import Config

    cfg = parse(Config, ["--run", "r", "--history", "Usual Suspects, The (1995)", "--history", "Heat (1995)",
                         "-k", "3"])
    assert cfg.history == ["Usual Suspects, The (1995)", "Heat (1995)"] and cfg.k == 3


# --- the command --------------------------------------------------------------------------

def test_cli_recommend_by_history(run_dir, capsys):
    rc = main(["recommend", "--run", str(run_dir), "--history", "Toy Story (1995)", "--history",
               "Usual Suspects, The (1995)", "--history", "Heet (1995)", "--history", "5", "-k", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[:3] == ["history:", "   1. #0 Toy Story (1995)", "   2. #11 Usual Suspects, The (1995)"]
    assert "'Heet (1995)' is not in the catalogue; nearest title: #" in lines[3] and "(distance " in lines[3]
    assert lines[4] == "   4. #5 Heat (1995)"
    assert any(line.startswith('generated: "') for line in lines)
    top = lines[lines.index("top 3 (distance):") + 1:]
    assert len(top) == 3 and top[0].split()[0] == "1."


def test_cli_recommend_by_user(run_dir, capsys):
    test = read_split(run_dir / "data", "test")
    user = test.user_ids[-1]
    last = max(r for r, u in enumerate(test.user_ids) if u == user)
    rc = main(["recommend", "--run", str(run_dir), "--user", str(user), "--include_target", "false", "--json",
               "--k", "4", "--use_ci"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [m["id"] for m in out["history"]] == test.histories[last][-10:]
    assert out["held_out"]["id"] == int(test.targets[last]) and out["use_ci"] is True
    assert len(out["items"]) == 4 and out["generated"]


def test_cli_errors(run_dir, capsys):
    assert main(["recommend", "--run", str(run_dir), "--history", "99"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("bigrec recommend: error: history[0]: item id 99 is not in "
                                                   "the catalogue") and "internal error" not in err, err
    assert main(["recommend", "--run", str(run_dir), "--user", "no-such-user"]) == 1
    assert "user 'no-such-user' has no row" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run_dir)]) == 1
    assert "give either --history" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run_dir.parent / "nowhere"), "--history", "x"]) == 1
    assert "not a finished run folder" in capsys.readouterr().err


def test_run_default_ranking_is_the_one_chosen_on_validation(run_dir, tmp_path, capsys):
    """run.yaml use_ci: true makes CI the default for recommend and serve alike, the answer says so,
    and an explicit use_ci false still gives the plain ranking."""
    note = "BIGRec + CI chosen on validation NDCG@10 (0.0500 with CI, 0.0100 without)"
    chosen = sibling_run(run_dir, tmp_path, use_ci=True, ranking_note=note)
    other = Recommender.from_run(chosen, device="cpu")
    assert other.default_ci and other.describe()["ranking_note"] == note
    default, plain, asked = other.recommend_queries([Query([0, 5, 7], k=5), Query([0, 5, 7], k=5, use_ci=False),
                                                     Query([0, 5, 7], k=5, use_ci=True)])
    assert default.use_ci and not plain.use_ci
    assert [i.id for i in default.items] == [i.id for i in asked.items] != [i.id for i in plain.items]
    assert default.ranking.startswith("BIGRec + CI") and note in default.ranking
    assert plain.ranking == "BIGRec (L2 distance to the generated title), as asked"
    (fixture_default,) = Recommender.from_run(run_dir, device="cpu").recommend([[0, 5, 7]], k=5)
    assert not fixture_default.use_ci and "the run's default" in fixture_default.ranking  # run.yaml: use_ci unset
    assert main(["recommend", "--run", str(chosen), "--history", "0", "--history", "5", "-k", "3"]) == 0
    assert f"ranking: BIGRec + CI (distances re-weighted by SASRec's scores), the run's default: {note}" in \
        capsys.readouterr().out


def test_history_bytes_that_are_not_utf8_are_a_one_line_error(run_dir, capsys):
    # how Python hands over argv bytes that are not UTF-8 ($'\xff\xfe Toy' in a shell)
    assert main(["recommend", "--run", str(run_dir), "--history", "\udcff\udcfe Toy"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "history[0]: title is not valid Unicode text" in err.splitlines()[-1]


def test_ci_blend_when_the_run_chose_it(run_dir, tmp_path, rec):
    from bigrec.baselines.sasrec import SASRec
    from bigrec.grounding.reweighting import minmax_rows

    blended = Recommender.from_run(sibling_run(run_dir, tmp_path, use_ci=True, ci_blend_weight=0.5), device="cpu")
    history = [0, 5, 7]
    (result,) = blended.recommend([history], k=len(TITLES))
    assert result.use_ci and "blended with SASRec's scores, weight 0.5" in result.ranking
    dist = torch.tensor([next(i.distance for i in result.items if i.id == j) for j in range(len(TITLES))])
    sasrec = SASRec.from_dir(run_dir / "sasrec").score([history]).float()
    expected = (0.5 * minmax_rows(dist[None]) - 0.5 * minmax_rows(sasrec))[0]
    assert [i.id for i in result.items] == torch.argsort(expected, stable=True).tolist()


def test_prompt_titles_follow_the_run(run_dir, tmp_path):
    """A run prepared with natural prompt titles gets its prompts written the same way."""
    natural = Recommender.from_run(sibling_run(run_dir, tmp_path, prompt_titles="natural"), device="cpu")
    assert '"The Usual Suspects (1995)"' in natural.prompt(["Usual Suspects, The (1995)"])
    plain = Recommender.from_run(run_dir, device="cpu")
    assert '"Usual Suspects, The (1995)"' in plain.prompt(["Usual Suspects, The (1995)"])


def title_logprobs(model, tok, prompt: str, titles: list[str], layout: str = "window") -> torch.Tensor:
    """Each title scored by its own forward pass after ``prompt``: the sum of its response tokens' log-probs."""
    from bigrec.llm.layouts import get_layout

    head = tok(prompt)["input_ids"]
    out = []
    for title in titles:
        tail = get_layout(layout).response_ids(tok, title)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([head + tail])).logits[0].float(), -1)
        out.append(sum(float(logp[len(head) - 1 + i, t]) for i, t in enumerate(tail)))
    return torch.tensor(out)


@pytest.fixture(scope="module")
def ranked(run_dir, tmp_path_factory):
    """The fixture run with run.yaml saying decoding: likelihood."""
    tmp = tmp_path_factory.mktemp("likelihood-run")
    return Recommender.from_run(sibling_run(run_dir, tmp, decoding="likelihood"), device="cpu")


def test_likelihood_run_ranks_every_title_by_its_log_probability(ranked):
    """Each title's score is its own log-probability given the history's prompt (one forward per title,
    with the adapter merged), best first; nothing is generated. Past the history's own titles the first
    taught answer comes first; the second is 12 tokens under the tiny tokenizer, so beam search, which
    normalises by length, finds it, but an unnormalised sum ranks it low."""
    distinct = list(dict.fromkeys(TITLES))
    (new,) = ranked.recommend([TAUGHT[0][0]], k=1, exclude_history=True)
    assert [i.title for i in new.items] == [TAUGHT[0][1]]
    for history, _ in TAUGHT:
        (result,) = ranked.recommend([history], k=len(TITLES))
        truth = title_logprobs(ranked.gen_model, ranked.tokenizer, ranked.prompt(history), distinct)
        order = [distinct[i] for i in torch.argsort(-truth, stable=True).tolist()]
        # the candidates are the decoder's (every title here: fewer than run.yaml's candidates); past them the
        # rest would follow by distance to the top title, as evaluate ranks a likelihood file
        assert result.decoding == "likelihood" and result.generated == order and result.grounded == order[0]
        assert result.items[0].distance == pytest.approx(0.0, abs=1e-3)
        assert list(dict.fromkeys(i.title for i in result.items)) == order
        assert sorted(i.id for i in result.items) == list(range(len(TITLES)))  # both Heat ids, next to each other
        for item in result.items:
            assert item.score == pytest.approx(-float(truth[distinct.index(item.title)]), abs=2e-4)
        assert "likelihood" in result.ranking and "the run's ranking" not in result.ranking


def test_likelihood_run_prior_exclusions_batches_and_no_ci(run_dir, tmp_path, ranked):
    """prior_weight subtracts the empty-history log-probability; exclude_history defaults to run.yaml's;
    an answer does not depend on its batch; CI is refused, since nothing is grounded."""
    history = ["Heat (1995)", "Babe (1995)"]
    with_prior = Recommender.from_run(sibling_run(run_dir, tmp_path, decoding="likelihood", prior_weight=0.5,
                                                  exclude_history=True), device="cpu")
    (result,) = with_prior.recommend([history], k=len(TITLES))
    assert {i.id for i in result.items} == set(range(len(TITLES))) - {HEAT, HEAT_TWIN, 7}  # the run's default
    row = with_prior._row(history)
    empty = with_prior.layout.empty_history_prompt(row)
    titles = [i.title for i in result.items]
    truth = (title_logprobs(with_prior.gen_model, with_prior.tokenizer, with_prior.prompt(history), titles)
             - 0.5 * title_logprobs(with_prior.gen_model, with_prior.tokenizer, empty, titles))
    assert [i.score for i in result.items] == pytest.approx((-truth).tolist(), abs=3e-4)
    assert [i.score for i in result.items] == sorted(i.score for i in result.items)
    (kept,) = with_prior.recommend([history], k=len(TITLES), exclude_history=False)
    assert {HEAT, HEAT_TWIN, 7} <= {i.id for i in kept.items}
    alone = [ranked.recommend([h], k=k)[0] for h, k in ((history, 3), ([0, 5], 5))]
    together = ranked.recommend_queries([Query(history, k=3), Query([0, 5], k=5)])
    assert [[i.id for i in r.items] for r in together] == [[i.id for i in r.items] for r in alone]
    assert [len(r.items) for r in together] == [3, 5]
    assert not ranked.has_ci and ranked.describe()["decoding"] == "likelihood"
    with pytest.raises(ValueError, match="ranks by likelihood"):
        ranked.recommend([history], use_ci=True)


def test_likelihood_run_blends_sasrec_where_run_yaml_gives_a_weight(run_dir, tmp_path, ranked):
    """likelihood_cf_weight: use_ci answers with likelihood + SASRec (its default with use_ci in run.yaml).
    Weight 0 keeps the plain likelihood order of the model's titles; a weight that dwarfs every
    log-probability puts SASRec's order first; the history's titles stay out of both lists."""
    from bigrec.baselines.sasrec import SASRec

    history = ["Heat (1995)", "Babe (1995)"]
    k = len(set(TITLES)) - 2  # every title the history leaves: the search ranks them all exactly
    served = {}
    for weight in (0.0, 1e6):
        folder = tmp_path / f"w{int(weight)}"
        folder.mkdir()
        served[weight] = Recommender.from_run(sibling_run(run_dir, folder, decoding="likelihood", use_ci=True,
                                                          likelihood_cf_weight=weight, exclude_history=True),
                                              device="cpu")
    assert served[0.0].has_ci and served[0.0].default_ci and served[0.0].describe()["likelihood_cf_weight"] == 0.0
    (plain,) = ranked.recommend([history], k=k, exclude_history=True)
    (zero,) = served[0.0].recommend([history], k=k)
    assert zero.use_ci and "+ SASRec" in zero.ranking and [i.id for i in zero.items] == [i.id for i in plain.items]
    (off,) = served[0.0].recommend([history], k=k, use_ci=False)
    assert not off.use_ci and [i.id for i in off.items] == [i.id for i in plain.items]
    sasrec = SASRec.from_dir(run_dir / "sasrec").score([[HEAT, 7]])[0].float()
    sasrec[[HEAT, HEAT_TWIN, 7]] = float("-inf")
    (heavy,) = served[1e6].recommend([history], k=3)
    assert [i.id for i in heavy.items] == torch.argsort(-sasrec, stable=True)[:3].tolist()
    # the decoder's candidates, the blend and the baselines of one request score its history once
    scored = served[1e6]._sasrec_scores.scored
    (again,) = served[1e6].recommend_queries([Query(history[::-1], 3, baselines=True)])
    assert served[1e6]._sasrec_scores.scored == scored + 1
    sasrec = SASRec.from_dir(run_dir / "sasrec").score([[7, HEAT]])[0].float()
    sasrec[[HEAT, HEAT_TWIN, 7]] = float("-inf")  # the run leaves the history out of the baselines too
    assert [s.id for s in again.baselines["sasrec"]] == torch.argsort(-sasrec, stable=True)[:3].tolist()
    assert not {HEAT, HEAT_TWIN, 7} & {i.id for i in served[1e6].recommend([history], k=len(TITLES))[0].items}
    # a content weight that dwarfs the rest ranks the candidates by closeness to the last history title
    folder = tmp_path / "content"
    folder.mkdir()
    content = Recommender.from_run(sibling_run(run_dir, folder, decoding="likelihood", use_ci=True,
                                               likelihood_cf_weight=0.0, likelihood_content_weight=1e6,
                                               exclude_history=True), device="cpu")
    (near,) = content.recommend([history], k=3)
    distance = l2_distances(content.items[[7]], content.items)[0]
    distance[[HEAT, HEAT_TWIN, 7]] = float("inf")
    assert [i.id for i in near.items] == torch.argsort(distance, stable=True)[:3].tolist()
    assert "closeness to the last history title" in near.ranking
    assert content.describe()["likelihood_content_weight"] == 1e6


def test_a_likelihood_run_answers_as_generate_ranked_in_evaluation(run_dir, tmp_path):
    """At precision auto (bf16 prompt and title passes on a CPU that has it, the embedding in fp32),
    recommend scores a history exactly as `bigrec generate --decoding likelihood` scored the same
    row when the run was evaluated: the same weights in the same dtype, so the served ranking is
    the evaluated one, near ties included."""
    from bigrec.stages import generate

    served = Recommender.from_run(sibling_run(run_dir, tmp_path, decoding="likelihood", precision="auto"),
                                  device="cpu")
    history = ["Toy Story (1995)", "Heat (1995)", "Babe (1995)"]
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{**served._row(history), "output": '"Casino (1995)"'}]))
    generate.run(generate.Config(base_model=str(run_dir / "base"), lora_weights=str(run_dir / "adapter"),
                                 catalog=str(run_dir / "data" / "id2name.txt"), test_data_path=str(rows),
                                 result_json_data=str(tmp_path / "ranked.json"), decoding="likelihood",
                                 precision="auto", candidates=6))
    (evaluated,) = json.loads((tmp_path / "ranked.json").read_text())
    (result,) = served.recommend([history], k=len(TITLES), exclude_history=False)
    titles = list(dict.fromkeys(i.title for i in result.items))[:6]
    scores = [next(i.score for i in result.items if i.title == t) for t in titles]
    assert titles == evaluated["predict"]
    assert [round(-s, 6) for s in scores] == evaluated["predict_scores"]


def test_a_timeline_run_writes_its_prompts_and_titles_as_timelines(run_dir, tmp_path):
    """layout: timeline (a model trained on users' timelines): the prompt is the history as timeline
    lines, and titles are scored as lines ending at the separator."""
    from bigrec.data.prompts import DOMAINS
    from bigrec.llm.layouts import get_layout

    lines = Recommender.from_run(sibling_run(run_dir, tmp_path, decoding="likelihood", layout="timeline"),
                                 device="cpu")
    history = ["Toy Story (1995)", "Heat (1995)"]
    timeline = get_layout("timeline")
    assert lines.prompt(history) == timeline.prompt(timeline.row(DOMAINS["movie"], history, ""))
    assert lines.prompt(history).endswith("Toy Story (1995)\nHeat (1995)\n")
    (result,) = lines.recommend([history], k=len(TITLES))
    distinct = list(dict.fromkeys(TITLES))
    truth = title_logprobs(lines.gen_model, lines.tokenizer, lines.prompt(history), distinct, "timeline")
    assert list(dict.fromkeys(i.title for i in result.items)) == [distinct[i] for i in
                                                                  torch.argsort(-truth, stable=True).tolist()]


def test_cli_recommend_with_a_likelihood_run(ranked, capsys):
    assert main(["recommend", "--run", str(ranked.run_dir), "--history", "Toy Story (1995)",
                 "--history", "Heat (1995)", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "generated:" not in out and "top 3 (-log p(title | history)):" in out
    assert out.split("top 3 (-log p(title | history)):\n")[1].splitlines()[0].endswith("Casino (1995)")


def test_manifest_refuses_unknown_decodings_and_layouts(run_dir, tmp_path):
    for key, value in (("decoding", "greedy"), ("layout", "grid")):
        path = tmp_path / key
        path.mkdir()
        (path / "run.yaml").write_text(f"base_model: base\n{key}: {value}\n")
        with pytest.raises(ValueError, match=rf"run.yaml: {key} '{value}' is not one of"):
            RunManifest.load(path)


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("decoding", DECODINGS)
def test_every_decoding_is_served_as_generate_and_evaluate_rank_it(run_dir, tmp_path, decoding, exclude, capsys):
    """One path from a model to an answer: for each decoding of the one list, a run.yaml naming it is
    served, and each test row's history gets generate's prompt, generate's list, and evaluate's
    rank of the target (with the history's titles left out by the same rule when asked)."""
    from bigrec.data.catalog import read_catalog, row_target
    from bigrec.llm.decoders import layout_of
    from bigrec.stages import evaluate, generate

    served = Recommender.from_run(sibling_run(run_dir, tmp_path, decoding=decoding, exclude_history=exclude),
                                  device="cpu")
    m, data = served.manifest, run_dir / "data"
    catalog = read_catalog(data / "id2name.txt")
    results = tmp_path / "results" / "test.json"
    gen = generate.Config(test_data_path=str(data / "test_5000.json"), result_json_data=str(results),
                          base_model=str(run_dir / "base"), lora_weights=str(run_dir / "adapter"), decoding=decoding,
                          num_beams=m.num_beams, max_new_tokens=m.max_new_tokens, precision=m.precision,
                          exclude_history=exclude, catalog=str(data / "id2name.txt") if decoding != "free" or exclude
                          else None)
    generate.run(gen)
    evaluate.run(evaluate.Config(catalog=str(data / "id2name.txt"), input_dir=str(results),
                                 output=str(tmp_path / "metrics.json"), base_model=str(run_dir / "base"),
                                 index_path=str(run_dir / "index.safetensors"), precision=m.precision,
                                 exclude_history=exclude))
    info = json.loads((tmp_path / "metrics.details.json").read_text())["files"]["test.json"]
    rows = json.loads(results.read_text())
    answers = served.recommend([row["history_item_id"] for row in rows], k=len(TITLES))
    checked = 0
    for row, answer, rank, tied in zip(rows, answers, info["ranks"]["test.json"], info["tied"]["test.json"],
                                       strict=True):
        assert served.prompt([catalog.titles[i] for i in row["history_item_id"]]) == layout_of(gen).prompt(row)
        assert answer.generated == [t for t in row["predict"] if t]
        seen = set(catalog.history_titles(row["history_item_id"])) if exclude else set()
        assert not seen & {i.id for i in answer.items}
        target = set(catalog.ids_for(catalog.titles[row_target(row, catalog, "test")]))
        if target & seen:  # evaluation never leaves a target out (repeat consumption); a request has no target
            continue
        if tied == 0:  # a target level with other items has no single place to compare
            assert min(p for p, item in enumerate(answer.items) if item.id in target) == rank
            checked += 1
    assert checked >= len(rows) // 2
    if decoding == "constrained":  # the command line says what the scores are
        assert main(["recommend", "--run", str(served.run_dir), "--history", "0", "--history", "5", "-k", "3"]) == 0
        out = capsys.readouterr().out
        assert "top 3 (score: the beams' items first (minus the beam score), then L2 distance):" in out
