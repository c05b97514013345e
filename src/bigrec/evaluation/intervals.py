"""Confidence intervals for NDCG@K / HR@K: percentile bootstrap over rows, plain and paired.

A metric is a mean over rows, so its uncertainty comes from which rows were drawn. Each
resample draws the rows with replacement (a fixed seed, so a rerun prints the same interval);
a paired comparison applies the same draws to both results, which is what makes a difference
on the same rows far tighter than two separate intervals suggest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bigrec.evaluation.metrics import TOPK, Ranks, row_metrics

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0
_CHUNK = 1 << 22  # resample indices held at once (32 MB of int64)


def row_gains(ranks: Ranks | torch.Tensor, topk: Sequence[int] = TOPK) -> dict[str, torch.Tensor]:
    """Per-row expected NDCG@K and HR@K, float64 [R, len(topk)] each, from the targets' :class:`Ranks`
    [R] (ties broken at random, :func:`bigrec.evaluation.metrics.row_metrics`)."""
    return row_metrics(ranks, topk)


def _resampled_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of ``values`` [R, C] over ``resamples`` bootstrap draws of the rows -> [B, C]."""
    rows = values.shape[0]
    gen = torch.Generator().manual_seed(seed)
    per = max(1, _CHUNK // rows)
    out = []
    for lo in range(0, resamples, per):
        idx = torch.randint(rows, (min(per, resamples - lo), rows), generator=gen)  # [b, R]
        out.append(values[idx].mean(1))  # [b, C]
    return torch.cat(out)


def _bounds(samples: torch.Tensor, level: float) -> list[list[float]]:
    """Percentile interval of each column of ``samples`` [B, C] -> C pairs [low, high]."""
    tail = (1 - level) / 2
    q = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype), dim=0)  # [2, C]
    return [[float(lo), float(hi)] for lo, hi in zip(q[0], q[1], strict=True)]


def _check(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def bootstrap_ci(ranks: Ranks | torch.Tensor, topk: Sequence[int] = TOPK, *, resamples: int = RESAMPLES,
                 level: float = LEVEL, seed: int = SEED) -> dict[str, list[list[float]]]:
    """``{"NDCG": [[low, high] per K], "HR": [...]}``: the interval of each metric's mean over rows."""
    _check(level, resamples)
    gains = row_gains(ranks, topk)
    both = torch.cat([gains["NDCG"], gains["HR"]], 1)  # one set of draws for every metric
    bounds = _bounds(_resampled_means(both, resamples, seed), level)
    k = len(topk)
    return {"NDCG": bounds[:k], "HR": bounds[k:]}


def paired_difference(ranks: Ranks | torch.Tensor, other: Ranks | torch.Tensor, topk: Sequence[int] = TOPK, *,
                      resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """Metric of ``ranks`` minus that of ``other`` on the same rows, with its paired interval.

    Returns ``{"NDCG": {"diff": [per K], "ci": [[low, high] per K]}, "HR": {...}}``; an interval
    entirely above zero says ``ranks`` is better at that level.
    """
    _check(level, resamples)
    if ranks.shape != other.shape:
        raise ValueError(f"paired results need the same rows: {tuple(ranks.shape)} vs {tuple(other.shape)}")
    a, b = row_gains(ranks, topk), row_gains(other, topk)
    delta = torch.cat([a["NDCG"] - b["NDCG"], a["HR"] - b["HR"]], 1)  # [R, 2K]
    bounds = _bounds(_resampled_means(delta, resamples, seed), level)
    mean = delta.mean(0).tolist()
    k = len(topk)
    return {"NDCG": {"diff": mean[:k], "ci": bounds[:k]}, "HR": {"diff": mean[k:], "ci": bounds[k:]}}


def rank_intervals(ranks: dict[str, Ranks], other: Ranks | None) -> dict[str, dict]:
    """Per run: its bootstrap interval and, with ``other`` ranks, the paired difference against them."""
    out = {}
    for run, r in ranks.items():
        out[run] = {"ci": bootstrap_ci(r, TOPK)}
        if other is not None:
            out[run]["paired"] = paired_difference(r, other, TOPK)
    return out
