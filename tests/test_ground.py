"""Grounding maths: distances, min-max, re-weighting, the gamma grid and the gamma search."""

from __future__ import annotations

import math

import pytest
import torch

from bigrec.evaluation.metrics import seen_mask, target_ranks
from bigrec.grounding.ranking import l2_distances
from bigrec.grounding.reweighting import (
    GAMMA_GRID,
    apply_gamma,
    blend_ranks,
    grid_ranks,
    minmax_rows,
    popularity_counts,
    reweight,
    search_gamma,
)

# Row A: target 2 (d=0.6) is more popular than item 1 (d=0.5): it overtakes it for gamma > log2(1.2).
# Row B: target 1 (d=0.2) is less popular than items 2, 3: it falls behind for gamma > log2(2.5), log2(5).
DIST = torch.tensor([[1.0, 2.0, 2.2, 3.0], [5.0, 5.6, 6.5, 8.0]], dtype=torch.float64)
SCORES = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
TARGETS = torch.tensor([2, 1])


def test_gamma_grid():
    assert len(GAMMA_GRID) == 198 and len(set(GAMMA_GRID)) == 198
    assert list(GAMMA_GRID) == sorted(GAMMA_GRID)
    assert GAMMA_GRID[:3] == (0.01, 0.02, 0.03) and 0.07 in GAMMA_GRID and 0.29 in GAMMA_GRID
    assert GAMMA_GRID[99:102] == (1.0, 2.0, 3.0) and GAMMA_GRID[-1] == 99.0
    assert all(isinstance(g, float) for g in GAMMA_GRID)


def test_minmax_rows_and_constant_rows():
    x = torch.tensor([[2.0, 4.0, 3.0], [7.0, 7.0, 7.0]])
    assert minmax_rows(x).tolist() == [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]
    assert minmax_rows(torch.tensor([1, 3, 5])).tolist() == [0.0, 0.5, 1.0]  # integer counts


def test_l2_distances_chunked():
    gen = torch.Generator().manual_seed(0)
    q, items = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    expected = ((q[:, None, :] - items[None, :, :]) ** 2).sum(-1).sqrt()
    got = l2_distances(q, items, chunk_rows=2)
    assert got.dtype == torch.float32 and got.shape == (5, 7)
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[R, D\]"):
        l2_distances(q, torch.randn(7, 4))


def test_reweight_by_hand_and_broadcast():
    got = reweight(DIST[:1], SCORES[0], gamma=1.0)  # 1-D popularity
    assert got.tolist()[0] == pytest.approx([0.0, 0.5, 0.6 / 2, 1.0 / 1.5])
    both = reweight(DIST, SCORES[0], gamma=0.5)
    assert torch.equal(both[1], reweight(DIST[1:], SCORES[0:1], gamma=0.5)[0])  # same vector on every row
    with pytest.raises(ValueError, match="do not match"):
        reweight(DIST, torch.ones(3), gamma=1.0)


def test_popularity_counts():
    assert popularity_counts([2, 0, 2, 3, 2], 5).tolist() == [1, 0, 3, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        popularity_counts([5], 5)


def test_popularity_moves_target_up():
    gammas = [0.1, 0.26, 0.27, 1.0, 2.0, 99.0]  # log2(1.2) = 0.263
    ranks = grid_ranks(DIST[:1], SCORES[0], TARGETS[:1], gammas)
    assert ranks[:, 0].tolist() == [2, 2, 1, 1, 1, 1]
    assert target_ranks(DIST[:1], TARGETS[:1]).tolist() == [2]
    b = grid_ranks(DIST, SCORES, TARGETS, [0.1, 1.3, 1.33, 2.3, 2.33])[:, 1]  # log2(2.5) = 1.32, log2(5) = 2.32
    assert b.tolist() == [1, 1, 2, 2, 3]


def test_nearest_target_stays_first():
    dist = torch.tensor([[0.3, 0.9, 0.1]])
    scores = torch.tensor([9.0, 0.0, 0.0])
    assert grid_ranks(dist, scores, torch.tensor([2]), [0.5, 99.0])[:, 0].tolist() == [0, 0]
    assert grid_ranks(dist, scores, [[1, 2]], [0.5, 99.0])[:, 0].tolist() == [0, 0]


@pytest.mark.parametrize("kind", ["popularity", "per_row"])
def test_grid_ranks_equal_brute_force(kind):
    gen = torch.Generator().manual_seed(1)
    rows, items = 40, 250
    dist = torch.rand(rows, items, generator=gen, dtype=torch.float64)
    scores = (torch.randint(0, 15, (items,), generator=gen) if kind == "popularity"  # many tied counts
              else torch.rand(rows, items, generator=gen, dtype=torch.float64))
    ids = torch.randint(0, items, (rows,), generator=gen)
    multi = [[int(t), (int(t) + 3) % items] if r % 3 else [int(t)] for r, t in enumerate(ids)]
    gammas = [0.01, 0.07, 0.3, 1.0, 4.0, 99.0]
    histories = [torch.randint(0, items, (10,), generator=gen).tolist() for _ in range(rows)]
    for targets in (ids, multi):
        fast = grid_ranks(dist, scores, targets, gammas)
        exclude = seen_mask(histories, targets, items)
        unseen = grid_ranks(dist, scores, targets, gammas, exclude=exclude)
        for g, gamma in enumerate(gammas):
            weighted = reweight(dist, scores.double(), gamma)
            assert fast[g].equal(target_ranks(weighted, targets))
            # seen items left out: the brute force with them pushed to the very end
            assert unseen[g].equal(target_ranks(weighted.masked_fill(exclude, float("inf")), targets))
        assert (unseen.better <= fast.better).all() and (unseen.better < fast.better).any()


@pytest.mark.parametrize("kind", ["popularity", "per_row"])
def test_grid_ranks_count_ties_as_the_brute_force_does(kind):
    """Items with the target's distance and score tie it at every gamma, and so do items at the
    row's smallest distance when the target is there too; ids sharing the target's title never do."""
    gen = torch.Generator().manual_seed(4)
    rows, items = 24, 60
    dist = torch.rand(rows, items, generator=gen, dtype=torch.float64)
    dist[:, 30:] = dist[:, :30]  # item j + 30 lies exactly where item j does
    dist[::4, 5] = dist[::4, 7] = dist[::4].amin(1)  # every fourth row: two items at the nearest distance
    if kind == "popularity":
        scores = torch.randint(0, 4, (30,), generator=gen).repeat(2)  # and is as popular: a tie
        scores[40] += 1  # one copy is more popular: no tie with item 10
    else:
        scores = torch.rand(rows, 30, generator=gen, dtype=torch.float64).repeat(1, 2)
    ids = torch.randint(0, 30, (rows,), generator=gen)
    ids[::4] = 5
    shared = [[int(t), (int(t) + 1) % 30] if r % 3 else [int(t)] for r, t in enumerate(ids)]  # two ids, one title
    gammas = [0.0, 0.05, 0.5, 1.0, 7.0]
    for targets in (ids, shared):
        fast = grid_ranks(dist, scores, targets, gammas)
        assert (fast.tied > 0).any()
        for g, gamma in enumerate(gammas):
            brute = target_ranks(reweight(dist, scores.double(), gamma), targets)
            assert fast[g].equal(brute), gamma


def test_search_gamma_by_hand():
    s = search_gamma(DIST, SCORES, TARGETS, topk=(1, 3), grid=(5.0, 0.1, 2.0, 0.5), single_k=3)
    # ranks per gamma 0.1, 0.5, 2, 5: row A 2,1,1,1; row B 1,1,2,3.
    g3, g2 = 1 / math.log2(4), 1 / math.log2(3)
    assert s.grid == (0.1, 0.5, 2.0, 5.0)
    assert s.valid_grid["NDCG"] == [[0.0, (g3 + g2) / 2], [0.0, g2], [0.0, (g2 + g3) / 2], [0.0, g2 / 2]]
    assert s.ndcg_gamma == {1: 0.1, 3: 0.5}  # NDCG@1 is 0 everywhere: ties go to the smallest gamma
    assert s.hr_gamma == {1: 0.1, 3: 0.1}
    assert s.single_gamma == 0.5
    assert s.valid_tuned == {"NDCG": [0.0, g2], "HR": [0.0, 1.0]}
    assert s.valid_single == {"NDCG": [0.0, g2], "HR": [0.0, 1.0]}
    out = apply_gamma(DIST, SCORES, TARGETS, s)
    assert out["tuned"] == s.valid_tuned and out["single"] == s.valid_single
    assert out["gammas"] == {"NDCG": [0.1, 0.5], "HR": [0.1, 0.1], "single": 0.5}
    with pytest.raises(ValueError, match="single_k"):
        search_gamma(DIST, SCORES, TARGETS, topk=(1, 3))


def test_search_and_apply_agree_on_same_rows():
    gen = torch.Generator().manual_seed(2)
    dist = torch.rand(60, 300, generator=gen)
    pop = torch.randint(0, 40, (300,), generator=gen)
    targets = torch.randint(0, 300, (60,), generator=gen)
    s = search_gamma(dist, pop, targets)
    out = apply_gamma(dist, pop, targets, s)
    assert out["tuned"] == s.valid_tuned and out["single"] == s.valid_single
    assert out["topk"] == [1, 3, 5, 10, 20, 50] and len(s.valid_grid["HR"]) == len(GAMMA_GRID)
    j = out["topk"].index(10)
    assert s.valid_tuned["NDCG"][j] == max(row[j] for row in s.valid_grid["NDCG"])
    assert all(isinstance(v, float) for v in out["tuned"]["NDCG"] + out["single"]["HR"])


def test_grid_ranks_with_leading_items_match_rank_with_beams_brute_force():
    """Constrained beams first in beam order, the rest re-weighted: the same ranks as the brute force."""
    from bigrec.grounding.ranking import rank_with_beams

    gen = torch.Generator().manual_seed(3)
    rows, items = 30, 25
    dist = torch.rand(rows, items, generator=gen, dtype=torch.float64)
    picks = torch.randint(items, (rows, 8), generator=gen).tolist()
    for multi in (False, True):  # one target id, or two sharing a title
        targets = [sorted({p[0], p[1]}) if multi and r % 2 else [p[0]] for r, p in enumerate(picks)]
        # beams: some name the target (row r % 3 == 0), some not, one row has none
        first = [([p[0]] if r % 3 == 0 else []) + p[2:2 + r % 5] for r, p in enumerate(picks)]
        for scores in (torch.rand(rows, items, generator=gen, dtype=torch.float64),
                       torch.rand(items, generator=gen, dtype=torch.float64)):
            gammas = [0.01, 0.3, 1.0, 4.0, 60.0]
            got = grid_ranks(dist, scores, targets, gammas, first)
            for g, ranks in zip(gammas, got, strict=True):
                assert ranks.equal(target_ranks(rank_with_beams(first, reweight(dist, scores, g)), targets))
    # a target among the beams keeps its place at every gamma
    assert grid_ranks(DIST, SCORES, TARGETS, [0.1, 50.0], [[3, 2], [1]]).tolist() == [[1, 0], [1, 0]]
    with pytest.raises(ValueError, match="leading item ids"):
        grid_ranks(DIST, SCORES, TARGETS, [0.1], [[4], []])
    with pytest.raises(ValueError, match="1 rows of leading items"):
        grid_ranks(DIST, SCORES, TARGETS, [0.1], [[1]])


def test_blend_ranks_weights_the_other_model_in():
    """w = 0 is the distance alone; a higher weight lets a high score beat the nearest item, which
    the paper's formula never lets happen."""
    targets = torch.tensor([2, 1])
    plain = blend_ranks(DIST, SCORES, targets, [0.0])[0]
    assert plain.equal(target_ranks(DIST, targets))
    ranks = blend_ranks(DIST, SCORES, targets, [0.0, 0.5, 0.95])
    assert ranks[:, 0].tolist() == [2, 0, 0]  # row A: the popular target overtakes the two nearer items
    assert ranks[:, 1].tolist() == [1, 3, 3]  # row B: the less popular target falls behind items 2 and 3
    nearest = torch.tensor([0, 0])
    assert grid_ranks(DIST, SCORES, nearest, [99.0])[0].tolist() == [0, 0]  # the paper's formula: always first
    assert blend_ranks(DIST, SCORES, nearest, [0.95])[0].tolist() == [2, 2]  # the blend: overtaken
