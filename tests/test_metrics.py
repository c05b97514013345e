"""All-rank NDCG/HR: hand-computed cases and bit-exact agreement with a per-row reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from bigrec.evaluation.metrics import (
    TOPK,
    ndcg_hr,
    ndcg_hr_many,
    seen_mask,
    target_id_lists,
    target_ranks,
    title_groups,
)


def reference_metrics(dist: torch.Tensor, target_lists: list[list[int]], topk=TOPK) -> dict[str, list[float]]:
    """The reference evaluate logic: argsort twice, best rank among the title's ids, loop over rows and K.

    The per-row terms are summed with ``math.fsum`` (correctly rounded), so the result does
    not depend on summation order; the reference adds them one by one.
    """
    rank = dist.argsort(dim=-1).argsort(dim=-1)
    ndcg, hr = [], []
    for k in topk:
        terms, hits = [], 0
        for i in range(len(target_lists)):
            min_id = min(rank[i][t].item() for t in target_lists[i])
            if min_id < k:
                terms.append(1 / math.log2(min_id + 2))
                hits += 1
        ndcg.append(math.fsum(terms) / len(target_lists))
        hr.append(hits / len(target_lists))
    return {"NDCG": ndcg, "HR": hr}


def test_hand_computed_ranks_and_metrics():
    dist = torch.tensor([[0.5, 0.1, 0.9, 0.3],   # target 0: items 1 and 3 are nearer -> rank 2
                         [0.2, 0.4, 0.1, 0.8],   # target 2: nearest -> rank 0
                         [0.7, 0.6, 0.5, 0.4]])  # target 0: farthest -> rank 3
    ranks = target_ranks(dist, torch.tensor([0, 2, 0]))
    assert ranks.tolist() == [2, 0, 3]
    m = ndcg_hr(ranks, topk=(1, 3, 5))
    assert m["HR"] == [1 / 3, 2 / 3, 1.0]
    assert m["NDCG"][0] == pytest.approx(1 / 3)
    assert m["NDCG"][1] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["NDCG"][2] == pytest.approx((1 + 0.5 + 1 / math.log2(5)) / 3)


def test_higher_is_better_and_ties_favour_target():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9]])
    assert target_ranks(scores, torch.tensor([2]), higher_is_better=True).tolist() == [2]
    assert target_ranks(scores, torch.tensor([3]), higher_is_better=True).tolist() == [0]  # tie with item 1


def test_duplicate_titles_take_best_rank():
    titles = ["A", "B", "A", "C", "B"]
    assert title_groups(titles) == {"A": [0, 2], "B": [1, 4], "C": [3]}
    lists = target_id_lists(torch.tensor([0, 4, 3]), titles)
    assert lists == [[0, 2], [1, 4], [3]]
    dist = torch.tensor([[0.9, 0.5, 0.1, 0.3, 0.7],   # "A": id 2 is nearest -> 0 (id 0 alone would be 4)
                         [0.1, 0.6, 0.2, 0.3, 0.4],   # "B": best of ids 1, 4 is id 4 -> rank 3
                         [0.1, 0.2, 0.3, 0.4, 0.5]])  # "C" -> rank 3
    assert target_ranks(dist, lists).tolist() == [0, 3, 3]
    assert target_ranks(dist, torch.tensor([0, 4, 3])).tolist() == [4, 3, 3]
    assert ndcg_hr(target_ranks(dist, lists)) == reference_metrics(dist, lists)


def test_target_id_lists_rejects_ids_outside_catalogue():
    with pytest.raises(ValueError, match="outside the catalogue"):
        target_id_lists([5], ["A", "B"])


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_equals_reference_loop_exactly(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, items = 97, 400
    dist = torch.rand(rows, items, generator=gen, dtype=torch.float64)  # continuous: no ties
    titles = [f"t{int(i)}" for i in torch.randint(0, 300, (items,), generator=gen)]  # some shared titles
    target_ids = torch.randint(0, items, (rows,), generator=gen)
    lists = target_id_lists(target_ids, titles)
    assert any(len(ids) > 1 for ids in lists)
    for targets, ref_lists in ((target_ids, [[int(t)] for t in target_ids]), (lists, lists)):
        got = ndcg_hr(target_ranks(dist, targets))
        assert got == reference_metrics(dist, ref_lists)  # exact, not approx


def test_many_groups_match_single_calls_and_topk_order():
    ranks = torch.tensor([[0, 5, 60, 2], [1, 1, 1, 49]])
    ndcg, hr = ndcg_hr_many(ranks, topk=(50, 1, 3))
    for g in range(2):
        single = ndcg_hr(ranks[g], topk=(50, 1, 3))
        assert (ndcg[g], hr[g]) == (single["NDCG"], single["HR"])
    assert hr[0] == [0.75, 0.25, 0.5]


def test_bad_inputs():
    dist = torch.rand(2, 3)
    with pytest.raises(ValueError, match="targets for 2 rows"):
        target_ranks(dist, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        target_ranks(dist, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="at least one"):
        target_ranks(dist, [[0], []])
    with pytest.raises(ValueError, match="rows > 0"):
        ndcg_hr(torch.tensor([], dtype=torch.long))


def test_full_size_runs():
    """5,000 rows x 20,000 items, the evaluation size of the paper's test sets (no timing asserted)."""
    gen = torch.Generator().manual_seed(0)
    dist = torch.rand(5000, 20000, generator=gen)
    targets = torch.randint(0, 20000, (5000,), generator=gen)
    ranks = target_ranks(dist, targets)
    assert ranks.shape == (5000,)
    assert int(ranks[0]) == int((dist[0] < dist[0, targets[0]]).sum())
    m = ndcg_hr(ranks)
    assert 0 < m["HR"][-1] < 0.02 and m["NDCG"] == sorted(m["NDCG"])


def test_seen_items_are_left_out_of_the_ranking():
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]])
    targets = [[3], [0, 4]]
    mask = seen_mask([[0, 1], [1, 4, 2]], targets, 5)
    # row 1's history holds one of its target ids (a repeat): it stays ranked
    assert mask.tolist() == [[True, True, False, False, False], [False, True, True, False, False]]
    assert target_ranks(dist, targets).tolist() == [3, 0]
    assert target_ranks(dist, targets, exclude=mask).tolist() == [1, 0]
    scores = -dist
    assert target_ranks(scores, targets, higher_is_better=True, exclude=mask).tolist() == [1, 0]
    with pytest.raises(ValueError, match="outside the catalogue"):
        seen_mask([[7]], [[0]], 5)
    with pytest.raises(ValueError, match="does not match"):
        target_ranks(dist, targets, exclude=mask[:1])
