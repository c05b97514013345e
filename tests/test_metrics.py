"""All-rank NDCG/HR: hand-computed cases and bit-exact agreement with a per-row reference loop."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from bigrec.evaluation.metrics import (
    TOPK,
    Ranks,
    details_ranks,
    ndcg_hr,
    ndcg_hr_many,
    row_metrics,
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


def test_higher_is_better_and_ties_take_the_expected_rank():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9]])
    assert target_ranks(scores, torch.tensor([2]), higher_is_better=True).tolist() == [2]
    tied = target_ranks(scores, torch.tensor([3]), higher_is_better=True)  # level with item 1: rank 0 or 1
    assert (tied.better.tolist(), tied.tied.tolist(), tied.tolist()) == ([0], [1], [0.5])
    m = ndcg_hr(tied, topk=(1, 2))
    assert m["HR"] == [0.5, 1.0]
    assert m["NDCG"] == [0.5, pytest.approx((1 + 1 / math.log2(3)) / 2)]


def test_constant_scorer_gets_the_metrics_of_a_uniformly_random_rank():
    """Every item level: the target is equally likely at ranks 0..N-1, and N = 4 is small enough by hand."""
    rows, items = 7, 4
    ranks = target_ranks(torch.zeros(rows, items), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    assert ranks.better.tolist() == [0] * rows and ranks.tied.tolist() == [3] * rows
    assert ranks.tolist() == [1.5] * rows and ranks.tied_targets() == rows
    m = ndcg_hr(ranks, topk=(1, 3, 5))
    assert m["HR"] == [1 / 4, 3 / 4, 1.0]
    g = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)]
    assert m["NDCG"] == [0.25, pytest.approx(sum(g[:3]) / 4, rel=1e-15), pytest.approx(sum(g) / 4, rel=1e-15)]
    # the same for a larger catalogue, against the closed form of a random ranking over N items
    from bigrec.stages.demo import random_ndcg_hr

    big = ndcg_hr(target_ranks(torch.ones(3, 137), torch.tensor([5, 0, 136]), higher_is_better=True))
    expected = random_ndcg_hr(137, TOPK)
    assert big["HR"] == [min(k, 137) / 137 for k in TOPK]
    assert big["NDCG"] == pytest.approx(expected["NDCG"], rel=1e-14)
    # the optimistic rank (0) would give NDCG@1 = 1; the rank's mean (68) plugged in would give 0
    assert big["NDCG"][0] == pytest.approx(1 / 137, rel=1e-15)


def test_shared_titles_take_the_best_rank_and_do_not_tie_with_the_target():
    titles = ["A", "B", "A", "C", "A"]
    lists = target_id_lists(torch.tensor([0, 0, 3]), titles)  # "A" is ids 0, 2 and 4
    dist = torch.tensor([[0.9, 0.1, 0.1, 0.5, 0.1],   # A's best (ids 2, 4) level with B only: rank 0 or 1
                         [0.9, 0.3, 0.2, 0.5, 0.9],   # A at 0.2 (id 2), nothing level
                         [0.9, 0.5, 0.5, 0.5, 0.1]])  # C at 0.5: A (id 4) ahead, B and A's ids 0.5 level
    ranks = target_ranks(dist, lists)
    assert ranks.better.tolist() == [0, 0, 1]
    assert ranks.tied.tolist() == [1, 0, 2]  # row 2: C ties with B and with id 2 (another title, counted)
    assert ranks.tied_targets() == 2
    # one id alone, not its title: the title's other ids at its distance count as ties
    assert target_ranks(dist, torch.tensor([2, 0, 3])).tied.tolist() == [2, 1, 2]


def brute_force_metrics(dist: torch.Tensor, target_lists: list[list[int]], topk=TOPK,
                        exclude: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Every ordering of each row's ranked items consistent with its distances, equally likely.

    The target's title counts as one entry at its best id's distance (its other ids are not
    ranked against it); every other id is an item of its own. The metric of a row is its mean
    over the orderings, the result the mean over rows.
    """
    ndcg, hr = [[] for _ in topk], [[] for _ in topk]
    for r, ids in enumerate(target_lists):
        best = min(float(dist[r, i]) for i in ids)
        entries = [("target", best)] + [(j, float(dist[r, j])) for j in range(dist.shape[1])
                                        if j not in ids and not (exclude is not None and exclude[r, j])]
        places = []
        for order in itertools.permutations(entries):
            if all(order[i][1] <= order[i + 1][1] for i in range(len(order) - 1)):
                places.append(next(p for p, e in enumerate(order) if e[0] == "target"))
        for j, k in enumerate(topk):
            ndcg[j].append(math.fsum(1 / math.log2(p + 2) for p in places if p < k) / len(places))
            hr[j].append(sum(p < k for p in places) / len(places))
    return {"NDCG": [math.fsum(v) / len(v) for v in ndcg], "HR": [math.fsum(v) / len(v) for v in hr]}


@pytest.mark.parametrize("seed", range(3))
def test_partial_ties_match_every_ordering(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, items = 12, 7
    dist = torch.randint(0, 3, (rows, items), generator=gen).double()  # three levels: many partial ties
    dist[0] = torch.arange(items).double()  # and one row with none
    titles = ["a", "b", "a", "c", "d", "e", "d"]
    targets = target_id_lists(torch.randint(0, items, (rows,), generator=gen), titles)
    exclude = seen_mask([torch.randint(0, items, (2,), generator=gen).tolist() for _ in range(rows)], targets, items)
    for left_out in (None, exclude):
        ranks = target_ranks(dist, targets, exclude=left_out)
        assert 0 < ranks.tied_targets() < rows
        got, want = ndcg_hr(ranks, (1, 2, 3, 5)), brute_force_metrics(dist, targets, (1, 2, 3, 5), left_out)
        for key in ("NDCG", "HR"):
            assert got[key] == pytest.approx(want[key], rel=1e-12)
        per_row = row_metrics(ranks, (1, 2, 3, 5))  # the bootstrap's per-row values average to the same
        for key in ("NDCG", "HR"):
            assert per_row[key].mean(0).tolist() == pytest.approx(want[key], rel=1e-12)


def test_tied_rows_sum_exactly_and_ranks_round_trip_through_a_details_file():
    ranks = Ranks(torch.tensor([0, 3, 2, 0, 60, 49]), torch.tensor([4, 0, 1, 0, 9, 2]))
    got = ndcg_hr(ranks, (1, 50))
    # by hand: row 0 is at 0..4, row 2 at 2..3, row 5 at 49..51 (one place of three below 50)
    assert got["HR"] == [float((Fraction(1, 5) + 1) / 6), float((4 + Fraction(1, 3)) / 6)]
    gain = [Fraction(1 / math.log2(p + 2)) for p in range(50)]
    by_hand = sum(gain[:5]) / 5 + gain[3] + (gain[2] + gain[3]) / 2 + gain[0] + gain[49] / 3
    assert got["NDCG"][1] == float(by_hand) / 6  # summed exactly, rounded once
    expected, tied = ranks.to_lists()
    assert expected == [2.0, 3.0, 2.5, 0.0, 64.5, 50.0]
    back = details_ranks({"ranks": {"run": expected}, "tied": {"run": tied}}, "run")
    assert back.equal(ranks)
    assert details_ranks({"ranks": {"run": [3, 0]}}, "run").equal(Ranks.strict([3, 0]))  # no tie counts: none
    with pytest.raises(ValueError, match="tie counts"):
        ndcg_hr(torch.tensor([2.5, 1.0]))
    many = ndcg_hr_many(Ranks.stack([ranks, ranks[[1, 0, 3, 2, 5, 4]]]), (1, 50))
    assert many[0][0] == many[0][1] == got["NDCG"] and many[1][0] == got["HR"]


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
    assert int(ranks.better[0]) == int((dist[0] < dist[0, targets[0]]).sum())
    assert ranks.tied_targets() == int((ranks.tied > 0).sum())  # float32 draws: a few level pairs at most
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
