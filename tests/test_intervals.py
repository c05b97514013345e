import math

import pytest
import torch

from bigrec.evaluation.intervals import bootstrap_ci, paired_difference, row_gains
from bigrec.evaluation.metrics import Ranks, ndcg_hr


def test_row_gains_average_to_the_metrics():
    ranks = torch.tensor([0, 1, 4, 9, 10, 49, 50, 1000])
    gains = row_gains(ranks)
    expected = ndcg_hr(ranks)
    for key in ("NDCG", "HR"):
        assert gains[key].mean(0).tolist() == pytest.approx(expected[key])
    assert gains["NDCG"][1, 0] == 0 and gains["NDCG"][1, 1] == pytest.approx(1 / math.log2(3))


def test_row_gains_of_tied_ranks_are_expectations():
    ranks = Ranks(torch.tensor([0, 0, 8, 2000]), torch.tensor([0, 3, 3, 7]))  # places 0, 0..3, 8..11, 2000..2007
    gains = row_gains(ranks, (1, 10))
    g = [1 / math.log2(p + 2) for p in range(12)]
    assert gains["HR"].tolist() == [[1.0, 1.0], [0.25, 1.0], [0.0, 0.5], [0.0, 0.0]]
    assert gains["NDCG"][:, 1].tolist() == pytest.approx([1.0, sum(g[:4]) / 4, (g[8] + g[9]) / 4, 0.0])
    expected = ndcg_hr(ranks, (1, 10))
    for key in ("NDCG", "HR"):
        assert gains[key].mean(0).tolist() == pytest.approx(expected[key])
    assert paired_difference(ranks, ranks.clone(), (1, 10))["NDCG"]["diff"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="tie counts"):
        row_gains(ranks.expected)  # an expected rank alone cannot give the expected metric


def test_constant_rows_have_a_point_interval():
    ci = bootstrap_ci(torch.zeros(50, dtype=torch.long))  # every row a hit at rank 0
    assert all(lo == hi == 1.0 for lo, hi in ci["HR"] + ci["NDCG"])
    ci = bootstrap_ci(torch.full((50,), 10_000))  # every row a miss
    assert all(lo == hi == 0.0 for lo, hi in ci["HR"])


def test_interval_matches_the_normal_approximation():
    """Half the rows hit at rank 0: HR@1 = 0.5, standard error sqrt(0.25 / R)."""
    rows = 2000
    ranks = torch.tensor([0, 100] * (rows // 2))
    lo, hi = bootstrap_ci(ranks, (1,), resamples=2000)["HR"][0]
    half = 1.96 * math.sqrt(0.25 / rows)
    assert lo == pytest.approx(0.5 - half, abs=0.004) and hi == pytest.approx(0.5 + half, abs=0.004)
    assert bootstrap_ci(ranks, (1,), resamples=2000) == bootstrap_ci(ranks, (1,), resamples=2000)  # fixed seed


def test_paired_difference_known_answers():
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 40, (1000,), generator=gen)
    same = paired_difference(base, base.clone())
    assert all(d == 0 for d in same["HR"]["diff"]) and all(lo == hi == 0 for lo, hi in same["HR"]["ci"])
    better = base.clone()
    better[:200] = 0  # 200 rows moved to the top
    out = paired_difference(better, base, (1, 10))
    assert out["HR"]["diff"][0] == pytest.approx(((base[:200] != 0).sum() / 1000).item())
    assert all(lo > 0 for lo, _ in out["HR"]["ci"])  # clearly better on the same rows
    reverse = paired_difference(base, better, (1, 10))
    assert reverse["HR"]["diff"][0] == pytest.approx(-out["HR"]["diff"][0])
    assert all(hi < 0 for _, hi in reverse["HR"]["ci"])


def test_pairing_is_tighter_than_separate_intervals():
    """A small improvement on correlated rows: the paired interval excludes zero although the two
    separate intervals overlap."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randint(0, 30, (3000,), generator=gen)
    better = base.clone()
    better[:60] = 0
    a, b = bootstrap_ci(better, (10,))["HR"][0], bootstrap_ci(base, (10,))["HR"][0]
    assert a[0] < b[1]  # overlapping
    assert paired_difference(better, base, (10,))["HR"]["ci"][0][0] > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(torch.zeros(3, dtype=torch.long), level=1.5)
