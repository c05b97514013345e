"""Rankings described by fields: one place makes a label, lookups go by fields."""

import pytest

from bigrec.evaluation.runs import RunKey, find_run


def test_labels_are_made_from_the_fields():
    assert RunKey("test.json").label == "test.json"
    assert RunKey("test.json", "last_title").label == "test.json last history title"
    assert RunKey("t.json", "reweighted", "CI", "each metric").label == "t.json +CI (gamma per metric@K)"
    assert RunKey("t.json", "reweighted", "popularity", "NDCG", 20).label == "t.json +popularity (gamma by NDCG@20)"
    assert RunKey("t.json", "blend", "CI", "NDCG", 10).label == "t.json +CI blend (weight by NDCG@10)"
    assert RunKey("t.json", "likelihood_cf", "SASRec", "NDCG", 10).label == "t.json +SASRec (weight by NDCG@10)"


@pytest.mark.parametrize("fields", [{"ranking": "reranked"}, {"chosen_by": "HR", "k": 10},
                                    {"chosen_by": "NDCG"}, {"chosen_by": "each metric", "k": 10}])
def test_a_key_that_names_nothing_is_refused(fields):
    with pytest.raises(ValueError):
        RunKey("t.json", **{"ranking": "reweighted", "weights": "CI", **fields})


def test_lookups_go_by_fields_whatever_the_labels_say():
    keys = [RunKey("t.json"), RunKey("t.json", "reweighted", "CI", "each metric"),
            RunKey("t.json", "reweighted", "CI", "NDCG", 10), RunKey("t.json", "blend", "CI", "NDCG", 10)]
    # labels renamed (an older or newer wording): the lookup reads only the fields
    info = {"runs": {f"run {i}": key.fields() for i, key in enumerate(keys)}}
    assert find_run(info, ranking="plain") == "run 0"
    assert find_run(info, ranking="reweighted", weights="CI", k=10) == "run 2"
    assert find_run(info, ranking="blend") == "run 3"
    assert find_run(info, ranking="last_title") is None
    with pytest.raises(ValueError, match="matches 2 rankings"):
        find_run(info, ranking="reweighted")
