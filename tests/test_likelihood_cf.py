"""Likelihood + SASRec (bigrec.grounding.likelihood_cf) against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from bigrec.grounding.likelihood_cf import (
    WEIGHT_GRID,
    Candidates,
    blend_ranks,
    blend_scores,
    candidates_of,
    choose_weights,
    last_title_content,
    merge,
    top_items,
)

# five items; SASRec's scores 0..4 become 0, .25, .5, .75, 1 after the row's min-max
SASREC = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
# the LM names titles 2 then 0; SASRec's top titles are 4 then 2 (2 keeps the LM's score)
ROW = {"predict_ids": [[2], [0]], "predict_scores": [-1.0, -2.0], "cf_ids": [[4], [2]], "cf_logp": [-3.0, -1.5]}


def order(scores: torch.Tensor) -> list[int]:
    return torch.argsort(-scores, stable=True).tolist()


def test_merge_keeps_the_lm_titles_first_with_their_scores():
    cand = candidates_of(ROW)
    assert cand == Candidates([[2], [0], [4]], [-1.0, -2.0, -3.0])
    assert candidates_of({"predict_ids": [[2]], "predict_scores": [-1.0]}) is None  # a row without SASRec's
    # a title is known by its ids: SASRec's [3, 1] overlaps the LM's [1, 3]
    assert merge([[1, 3]], [-1.0], [[3, 1], [0]], [-9.0, -4.0]) == Candidates([[1, 3], [0]], [-1.0, -4.0])


def test_blend_scores_by_hand():
    cand = [candidates_of(ROW)]
    # w = 0: candidates by log p (2, 0, 4), then the others below the worst (-3) by SASRec: 3 (.75), 1 (.25)
    w0 = blend_scores(cand, SASREC, 0.0)[0]
    assert w0[[2, 0, 4]].tolist() == [-1.0, -2.0, -3.0]
    assert w0[[3, 1]].tolist() == pytest.approx([-5.0 + 0.75, -5.0 + 0.25])
    assert order(w0) == [2, 0, 4, 3, 1]
    # w = 8: item 2: -1 + 8 * .5 = 3, item 0: -2 + 0 = -2, item 4: -3 + 8 = 5
    w8 = blend_scores(cand, SASREC, 8.0)[0]
    assert w8[[4, 2, 0]].tolist() == [5.0, 3.0, -2.0]
    assert order(w8) == [4, 2, 0, 3, 1]
    # items sharing a title share its log p, not SASRec's score
    shared = blend_scores([Candidates([[1, 3]], [-1.0])], SASREC, 2.0)[0]
    assert shared[[3, 1]].tolist() == [0.5, -0.5] and order(shared) == [3, 1, 4, 2, 0]
    with pytest.raises(ValueError):
        blend_scores(cand, SASREC, -1.0)


def test_blend_ranks_count_ties_and_leave_excluded_items_out():
    cand = [candidates_of(ROW)]
    # target 4: two ahead at w = 0; at w = 4 item 2 scores -1 + 2 = 1 = item 4's -3 + 4: a tie; first at w = 8
    ranks = blend_ranks(cand, SASREC, [[4]], [0.0, 4.0, 8.0])
    assert ranks.better[:, 0].tolist() == [2, 0, 0] and ranks.tied[:, 0].tolist() == [0, 1, 0]
    # target 3, no candidate: below the three candidates, first of the rest
    assert blend_ranks(cand, SASREC, [[3]], [0.0]).better.tolist() == [[3]]
    excluded = torch.tensor([[False, False, True, False, False]])
    assert blend_ranks(cand, SASREC, [[0]], [0.0], excluded).better.tolist() == [[0]]


def test_choose_weight_by_validation_ndcg10_smallest_on_a_tie():
    cand = [candidates_of(ROW)] * 2
    sasrec = SASREC.expand(2, 5)
    weight, content_weight, ndcg = choose_weights(cand, sasrec, [[4], [4]], (0.0, 8.0))
    assert (weight, content_weight) == (8.0, 0.0) and ndcg[0] == pytest.approx([0.5, 1.0])  # rank 2: 1 / log2(4)
    weight, _, ndcg = choose_weights(cand, sasrec, [[2], [2]], (0.0, 0.5, 8.0))  # 2 first at 0 and 0.5
    assert weight == 0.0 and ndcg[0][:2] == [1.0, 1.0] and ndcg[0][2] < 1.0
    assert WEIGHT_GRID[0] == 0.0 and list(WEIGHT_GRID) == sorted(WEIGHT_GRID)


def test_the_last_titles_content_term_is_kept_only_where_validation_gains():
    """Items 0..4 on a line (embeddings 0, 1, 2, 3, 4), the history ending on item 0: the content term
    ranks 0 first and 4 last. Target 0, which the LM names second and SASRec does not lift, needs it;
    target 2, the LM's first, needs nothing: no term is kept (the fewer terms on a tie)."""
    items = torch.arange(5, dtype=torch.float32)[:, None]
    content = last_title_content([[3, 0], []], items)
    assert content[0].tolist() == [0.0, -1.0, -2.0, -3.0, -4.0] and content[1].tolist() == [0.0] * 5
    cand = [candidates_of(ROW)]
    by_hand = blend_scores(cand, SASREC, 1.0, content[:1], 2.0)[0]
    # minmax(content) = 1, .75, .5, .25, 0; item 0: -2 + 0 + 2, item 2: -1 + .5 + 1, item 4: -3 + 1 + 0
    assert by_hand[[0, 2, 4]].tolist() == pytest.approx([0.0, 0.5, -2.0])
    sasrec = torch.tensor([[0.0, 1.0, 4.0, 3.0, 2.0]])  # SASRec puts the LM's first title (2) first too
    weight, content_weight, ndcg = choose_weights(cand, sasrec, [[0]], (0.0, 1.0), content=content[:1],
                                                  content_grid=(0.0, 4.0))
    assert (weight, content_weight) == (0.0, 4.0) and ndcg[1][0] == 1.0 and max(ndcg[0]) < 1.0
    assert choose_weights(cand, sasrec, [[2]], (0.0, 1.0), content=content[:1], content_grid=(0.0, 4.0))[:2] == \
        (0.0, 0.0)
    assert top_items(cand[0], sasrec[0], 0.0, 3, content=content[0], content_weight=4.0)[0][0] == 0
    with pytest.raises(ValueError, match="content"):
        blend_scores(cand, SASREC, 1.0, None, 2.0)
