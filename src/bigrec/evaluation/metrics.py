"""All-rank NDCG@K and HR@K with one relevant item per row, vectorised.

A target's rank is the number of catalogue items strictly better than it (no argsort), and
when several ids share the target's title the best of them counts. Sums over rows are exact
(rational arithmetic on counts per rank), so the result does not depend on summation order
and matches a per-row loop bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import torch

TOPK: tuple[int, ...] = (1, 3, 5, 10, 20, 50)

# Elements of one [rows, items] comparison block; bounds temporary memory (~16M bools).
_BLOCK = 1 << 24

Targets = torch.Tensor | Sequence[Sequence[int]] | Sequence[int]


def title_groups(titles: Sequence[str]) -> dict[str, list[int]]:
    """Map each title to every catalogue id carrying it (ids in increasing order)."""
    groups: dict[str, list[int]] = {}
    for item_id, title in enumerate(titles):
        groups.setdefault(title, []).append(item_id)
    return groups


def target_id_lists(target_ids: Sequence[int] | torch.Tensor, titles: Sequence[str]) -> list[list[int]]:
    """For each target id, all ids with the same title (the set whose best rank counts)."""
    groups = title_groups(titles)
    ids = target_ids.tolist() if isinstance(target_ids, torch.Tensor) else list(target_ids)
    out = []
    for t in ids:
        if not 0 <= int(t) < len(titles):
            raise ValueError(f"target id {t} is outside the catalogue of {len(titles)} items")
        out.append(groups[titles[int(t)]])
    return out


def target_index(targets: Targets, rows: int, num_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets as a padded id matrix [R, M] and its mask [R, M].

    Padding repeats the row's first id, so a min or max over a row is right even unmasked.
    """
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 1:
            raise ValueError(f"target tensor must be 1-D [rows], got shape {tuple(targets.shape)}")
        idx = targets.long().reshape(-1, 1)
        mask = torch.ones_like(idx, dtype=torch.bool)
    else:
        lists = [[int(t)] if isinstance(t, numbers.Integral) else [int(x) for x in t] for t in targets]
        if any(not ids for ids in lists):
            raise ValueError("every row needs at least one target id")
        width = max((len(ids) for ids in lists), default=1)
        idx = torch.zeros(len(lists), width, dtype=torch.long)
        mask = torch.zeros(len(lists), width, dtype=torch.bool)
        for r, ids in enumerate(lists):  # building the index, not computing ranks
            idx[r] = ids[0]
            idx[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = True
    if idx.shape[0] != rows:
        raise ValueError(f"{idx.shape[0]} targets for {rows} rows")
    live = idx[mask]
    if live.numel() and (live.min() < 0 or live.max() >= num_items):
        raise ValueError(f"target ids must lie in [0, {num_items}), got {live.min()}..{live.max()}")
    return idx, mask


def seen_mask(histories: Sequence[Sequence[int]], targets: Targets, num_items: int) -> torch.Tensor:
    """[R, N] bool: the items of each row's history, left out of its ranking (never a target id).

    For all-rank evaluation on data where a user meets an item once (MovieLens ratings), an
    item already in the history cannot be the next one; ranking it only pushes real candidates
    down. A history item that is also the row's target (repeat consumption) stays ranked.
    """
    rows = len(histories)
    idx, mask = target_index(targets, rows, num_items)
    out = torch.zeros(rows, num_items, dtype=torch.bool)
    for r, items in enumerate(histories):  # building the mask: ~10 ids per row
        ids = [int(i) for i in items]
        if ids and not 0 <= min(ids) <= max(ids) < num_items:
            raise ValueError(f"row {r}: history item ids outside the catalogue (0..{num_items - 1})")
        out[r, ids] = True
    row_of = torch.arange(rows).unsqueeze(1).expand_as(idx)
    out[row_of[mask], idx[mask]] = False  # a target id is never left out
    return out


def target_ranks(dist: torch.Tensor, targets: Targets, *, higher_is_better: bool = False,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target: how many items are strictly better than its best id.

    dist: [R, N] distances (or scores with ``higher_is_better``). Ties count in the target's
    favour. The best rank among several ids is the count of items better than the best of
    them, so one comparison pass per row suffices. ``exclude`` [R, N] (:func:`seen_mask`):
    items that are not ranked at all, so they are never counted as better.
    """
    if dist.dim() != 2:
        raise ValueError(f"dist must be [rows, items], got shape {tuple(dist.shape)}")
    rows, num_items = dist.shape
    idx, mask = target_index(targets, rows, num_items)
    worst = float("-inf") if higher_is_better else float("inf")
    best = dist.gather(1, idx).masked_fill(~mask, worst)  # [R, M]
    best = best.amax(1) if higher_is_better else best.amin(1)  # [R]
    ranks = torch.empty(rows, dtype=torch.long)
    step = max(1, _BLOCK // max(num_items, 1))
    if exclude is not None and exclude.shape != dist.shape:
        raise ValueError(f"exclude mask {tuple(exclude.shape)} does not match {tuple(dist.shape)}")
    for lo in range(0, rows, step):  # row chunks bound memory; each chunk is one vector op
        block, ref = dist[lo : lo + step], best[lo : lo + step, None]
        better = block > ref if higher_is_better else block < ref
        if exclude is not None:
            better &= ~exclude[lo : lo + step]
        ranks[lo : lo + step] = better.sum(1)
    return ranks


def _gains(k_max: int) -> list[float]:
    """Discounted gain 1/log2(rank+2) for ranks 0..k_max-1, as Python floats."""
    return [1.0 / math.log2(r + 2) for r in range(k_max)]


def ndcg_hr_many(ranks: torch.Tensor, topk: Sequence[int] = TOPK) -> tuple[list[list[float]], list[list[float]]]:
    """NDCG and HR for each row of ``ranks`` [G, R] (e.g. one row per gamma): two [G][len(topk)] lists.

    Rows are counted per rank value (bincount), then sums are taken exactly in rationals and
    rounded once, which equals a correctly rounded per-row sum (``math.fsum``).
    """
    if ranks.dim() != 2 or ranks.shape[1] == 0:
        raise ValueError(f"ranks must be [groups, rows] with rows > 0, got shape {tuple(ranks.shape)}")
    ks = [int(k) for k in topk]
    if not ks or min(ks) < 1:
        raise ValueError(f"topk must be positive integers, got {list(topk)}")
    k_max = max(ks)
    groups, rows = ranks.shape
    clipped = ranks.long().clamp(min=0, max=k_max)  # rank >= k_max falls in the last bin
    offsets = torch.arange(groups).unsqueeze(1) * (k_max + 1)
    counts = torch.bincount((clipped + offsets).flatten(), minlength=groups * (k_max + 1))
    counts = counts.view(groups, k_max + 1)[:, :k_max].tolist()  # [G][k_max] rows per rank
    gains = [Fraction(g) for g in _gains(k_max)]
    ndcg, hr = [], []
    for per_rank in counts:  # one pass per group over k_max ranks, never per row
        dcg, hits, dcg_at, hits_at = Fraction(0), 0, [], []
        for count, gain in zip(per_rank, gains, strict=True):
            dcg += count * gain
            hits += count
            dcg_at.append(dcg)
            hits_at.append(hits)
        ndcg.append([float(dcg_at[k - 1]) / rows for k in ks])
        hr.append([hits_at[k - 1] / rows for k in ks])
    return ndcg, hr


def ndcg_hr(ranks: torch.Tensor, topk: Sequence[int] = TOPK) -> dict[str, list[float]]:
    """NDCG@K (gain 1/log2(rank+2) if rank < K) and HR@K (rank < K), averaged over rows, in topk order."""
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D [rows], got shape {tuple(ranks.shape)}")
    ndcg, hr = ndcg_hr_many(ranks.unsqueeze(0), topk)
    return {"NDCG": ndcg[0], "HR": hr[0]}
