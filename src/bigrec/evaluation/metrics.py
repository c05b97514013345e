"""All-rank NDCG@K and HR@K with one relevant item per row, vectorised, ties counted honestly.

A target's place is two counts (:class:`Ranks`): the catalogue items strictly better than it
(no argsort) and the other items with exactly its score. When several ids share the target's
title the best of them counts, and the others with that title are neither better nor tied (a
title is what the model names). Ties with different titles (popularity counts, likelihood
scores, a constant scorer) are broken at random: with ``better`` items ahead and ``tied`` tied,
the target's 0-based rank is uniform on ``better .. better + tied``, and every metric is its
exact expectation over those places (McSherry and Najork, ECIR 2008), never the optimistic
rank nor the metric of the mean rank. Sums over rows are exact (rational arithmetic on counts
per distinct place), so the result does not depend on summation order and matches a per-row
loop bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

TOPK: tuple[int, ...] = (1, 3, 5, 10, 20, 50)

# Elements of one [rows, items] comparison block; bounds temporary memory (~16M bools).
_BLOCK = 1 << 24

Targets = torch.Tensor | Sequence[Sequence[int]] | Sequence[int]


@dataclass(frozen=True)
class Ranks:
    """Where each target lies in its ranking: ``better`` items strictly ahead of it and ``tied``
    other items with exactly its score, two int64 tensors of one shape ([R], or [G, R] for G
    rankings of the same rows). Random tie-breaking puts the target at each 0-based rank
    ``better .. better + tied`` with equal chance; :attr:`expected` is the mean of those."""

    better: torch.Tensor
    tied: torch.Tensor

    def __post_init__(self) -> None:
        if self.better.shape != self.tied.shape:
            raise ValueError(f"better {tuple(self.better.shape)} and tied {tuple(self.tied.shape)} differ in shape")
        object.__setattr__(self, "better", self.better.long())
        object.__setattr__(self, "tied", self.tied.long())

    @classmethod
    def strict(cls, better: torch.Tensor | Sequence[int]) -> Ranks:
        """Ranks of a ranking with no ties."""
        better = torch.as_tensor(better, dtype=torch.long)
        return cls(better, torch.zeros_like(better))

    @classmethod
    def miss(cls, rows: int, num_items: int) -> Ranks:
        """[rows] targets ranked past the catalogue and every K (an empty generation)."""
        return cls.strict(torch.full((rows,), miss_rank(num_items), dtype=torch.long))

    @classmethod
    def stack(cls, ranks: Sequence[Ranks]) -> Ranks:
        return cls(torch.stack([r.better for r in ranks]), torch.stack([r.tied for r in ranks]))

    @classmethod
    def from_expected(cls, expected: Sequence[float] | torch.Tensor, tied: Sequence[int] | torch.Tensor) -> Ranks:
        """Back from :meth:`to_lists`: ``better = expected - tied / 2``, exact in float64."""
        tied = torch.as_tensor(tied, dtype=torch.long)
        better = torch.as_tensor(expected, dtype=torch.float64) - tied.double() / 2
        if better.shape != tied.shape or not torch.equal(better, better.round()):
            raise ValueError("expected ranks and tie counts do not fit together (need one of each per row)")
        return cls(better.long(), tied)

    @property
    def shape(self) -> torch.Size:
        return self.better.shape

    def dim(self) -> int:
        return self.better.dim()

    def numel(self) -> int:
        return self.better.numel()

    def __len__(self) -> int:
        return len(self.better)

    @property
    def expected(self) -> torch.Tensor:
        """The mean 0-based rank under random tie-breaking, float64."""
        return self.better.double() + self.tied.double() / 2

    def tolist(self) -> list:
        """The expected ranks as Python floats."""
        return self.expected.tolist()

    def to_lists(self) -> tuple[list, list]:
        """(expected ranks, tie counts) as plain lists, for a details file."""
        return self.expected.tolist(), self.tied.tolist()

    def tied_targets(self) -> int:
        """How many targets share their score with at least one other item."""
        return int((self.tied > 0).sum())

    def clone(self) -> Ranks:
        return Ranks(self.better.clone(), self.tied.clone())

    def equal(self, other: Ranks) -> bool:
        return torch.equal(self.better, other.better) and torch.equal(self.tied, other.tied)

    def __getitem__(self, index) -> Ranks:
        return Ranks(self.better[index], self.tied[index])

    def __setitem__(self, index, value: Ranks | int) -> None:
        """Set rows from other ranks, or from an int (a rank with no ties, e.g. a miss)."""
        if isinstance(value, Ranks):
            self.better[index], self.tied[index] = value.better, value.tied
        else:
            self.better[index], self.tied[index] = value, 0

    def where(self, condition: torch.Tensor, other: Ranks) -> Ranks:
        """These ranks where ``condition`` holds, ``other``'s elsewhere."""
        return Ranks(torch.where(condition, self.better, other.better), torch.where(condition, self.tied, other.tied))

    def best_of(self, other: Ranks) -> Ranks:
        """Per row, whichever of the two has the smaller expected rank (fewer ties on a draw)."""
        mine, theirs = self.expected, other.expected
        take = (mine < theirs) | ((mine == theirs) & (self.tied <= other.tied))
        return self.where(take, other)


def as_ranks(ranks: Ranks | torch.Tensor | Sequence[int]) -> Ranks:
    """:class:`Ranks` as they are; integer ranks as ranks with no ties. Float ranks are refused:
    an expected rank alone does not give the expected metrics (read them with :func:`details_ranks`)."""
    if isinstance(ranks, Ranks):
        return ranks
    tensor = torch.as_tensor(ranks)
    if tensor.is_floating_point():
        raise ValueError("float ranks (expected ranks) need their tie counts: pass Ranks, or read a details "
                         "file with bigrec.evaluation.metrics.details_ranks")
    return Ranks.strict(tensor)


def details_ranks(info: dict, run: str) -> Ranks:
    """One run's per-row ranks from a ``files`` entry of an evaluate details file (``ranks``:
    expected ranks, ``tied``: tie counts). A file written before ties were counted has no
    ``tied``: its ranks are then read as they were written, with no ties."""
    expected = info["ranks"][run]
    tied = info.get("tied", {}).get(run)
    return Ranks.from_expected(expected, [0] * len(expected) if tied is None else tied)


def miss_rank(num_items: int) -> int:
    """A rank past the whole catalogue and past every K in :data:`TOPK`."""
    return max(num_items, *TOPK)


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
    """Targets as a padded id matrix [R, M] and its mask [R, M]; an id repeated in a row counts once.

    Padding repeats the row's first id, so a min or max over a row is right even unmasked.
    """
    if isinstance(targets, torch.Tensor):
        if targets.dim() != 1:
            raise ValueError(f"target tensor must be 1-D [rows], got shape {tuple(targets.shape)}")
        idx = targets.long().reshape(-1, 1)
        mask = torch.ones_like(idx, dtype=torch.bool)
    else:
        lists = [[int(t)] if isinstance(t, numbers.Integral) else list(dict.fromkeys(int(x) for x in t))
                 for t in targets]
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
                 exclude: torch.Tensor | None = None) -> Ranks:
    """Each row's target against the items of its ranking -> :class:`Ranks` [R].

    dist: [R, N] distances (or scores with ``higher_is_better``). The target's value is the best
    of its ids; ``better`` counts the items strictly better than it, ``tied`` the items equal
    to it that are not one of its ids, so one comparison pass per row suffices. ``exclude``
    [R, N] (:func:`seen_mask`): items that are not ranked at all, neither better nor tied.
    """
    if dist.dim() != 2:
        raise ValueError(f"dist must be [rows, items], got shape {tuple(dist.shape)}")
    rows, num_items = dist.shape
    idx, mask = target_index(targets, rows, num_items)
    if exclude is not None and exclude.shape != dist.shape:
        raise ValueError(f"exclude mask {tuple(exclude.shape)} does not match {tuple(dist.shape)}")
    worst = float("-inf") if higher_is_better else float("inf")
    own = dist.gather(1, idx)  # [R, M]
    best = own.masked_fill(~mask, worst)
    best = best.amax(1) if higher_is_better else best.amin(1)  # [R]
    # the target's own ids at its best value: equal to it, but not ties
    own_ties = (own == best[:, None]) & mask
    if exclude is not None:
        own_ties &= ~exclude.gather(1, idx)
    better = torch.empty(rows, dtype=torch.long)
    tied = own_ties.sum(1).neg_()
    step = max(1, _BLOCK // max(num_items, 1))
    for lo in range(0, rows, step):  # row chunks bound memory; each chunk is one vector op
        block, ref = dist[lo : lo + step], best[lo : lo + step, None]
        ahead = block > ref if higher_is_better else block < ref
        level = block == ref
        if exclude is not None:
            ahead &= ~exclude[lo : lo + step]
            level &= ~exclude[lo : lo + step]
        better[lo : lo + step] = ahead.sum(1)
        tied[lo : lo + step] += level.sum(1)
    return Ranks(better, tied)


def _gains(k_max: int) -> list[float]:
    """Discounted gain 1/log2(rank+2) for ranks 0..k_max-1, as Python floats."""
    return [1.0 / math.log2(r + 2) for r in range(k_max)]


def _check_topk(topk: Sequence[int]) -> list[int]:
    ks = [int(k) for k in topk]
    if not ks or min(ks) < 1:
        raise ValueError(f"topk must be positive integers, got {list(topk)}")
    return ks


def row_metrics(ranks: Ranks | torch.Tensor, topk: Sequence[int] = TOPK) -> dict[str, torch.Tensor]:
    """Each row's expected NDCG@K and HR@K, float64 [R, len(topk)] each (for intervals).

    A row's value is the mean of the metric over its places ``better .. better + tied``; with no
    ties, the metric at its rank.
    """
    ranks = as_ranks(ranks)
    if ranks.dim() != 1 or not len(ranks):
        raise ValueError(f"ranks must be 1-D and non-empty, got shape {tuple(ranks.shape)}")
    ks = _check_topk(topk)
    k_max = max(ks)
    place = torch.arange(k_max)  # [P]
    gains = 1.0 / torch.log2(place.double() + 2)  # [P]
    lo, hi = ranks.better.unsqueeze(1), (ranks.better + ranks.tied).unsqueeze(1)  # [R, 1]
    inside = (place >= lo) & (place <= hi)  # [R, P]: the places the target can take
    share = 1.0 / (ranks.tied.double() + 1).unsqueeze(1)  # [R, 1]
    within = place < torch.tensor(ks).unsqueeze(1)  # [K, P]
    counted = inside.unsqueeze(1) & within  # [R, K, P]
    return {"NDCG": (counted * gains).sum(-1) * share, "HR": counted.sum(-1).double() * share}


def ndcg_hr_many(ranks: Ranks | torch.Tensor,
                 topk: Sequence[int] = TOPK) -> tuple[list[list[float]], list[list[float]]]:
    """Expected NDCG and HR for each row of ``ranks`` [G, R] (e.g. one row per gamma): two [G][len(topk)] lists.

    Untied rows are counted per rank value (bincount); tied rows that can reach the top K are
    counted per distinct (better, tied) pair. Sums are then taken exactly in rationals and rounded
    once, which equals a correctly rounded per-row sum (``math.fsum``).
    """
    ranks = as_ranks(ranks)
    if ranks.dim() != 2 or ranks.shape[1] == 0:
        raise ValueError(f"ranks must be [groups, rows] with rows > 0, got shape {tuple(ranks.shape)}")
    ks = _check_topk(topk)
    k_max = max(ks)
    groups, rows = ranks.shape
    better, tied = ranks.better.clamp(min=0), ranks.tied.clamp(min=0)
    alone = tied == 0
    clipped = torch.where(alone, better.clamp(max=k_max), k_max)  # rank >= k_max, or tied: the last bin
    offsets = torch.arange(groups).unsqueeze(1) * (k_max + 1)
    counts = torch.bincount((clipped + offsets).flatten(), minlength=groups * (k_max + 1))
    counts = counts.view(groups, k_max + 1)[:, :k_max].tolist()  # [G][k_max] untied rows per rank
    spread: list[list[tuple[int, int, int]]] = [[] for _ in range(groups)]  # per group: (better, tied, rows)
    reach = ~alone & (better < k_max)
    if reach.any():
        group_of = torch.arange(groups).unsqueeze(1).expand_as(better)
        keys = torch.stack([group_of[reach], better[reach], tied[reach]], 1)
        distinct, how_many = torch.unique(keys, dim=0, return_counts=True)
        for (g, b, t), n in zip(distinct.tolist(), how_many.tolist(), strict=True):  # distinct places, not rows
            spread[g].append((b, t, n))
    gains = [Fraction(g) for g in _gains(k_max)]
    upto = [Fraction(0)]  # upto[p]: sum of the gains of ranks 0..p-1
    for gain in gains:
        upto.append(upto[-1] + gain)
    ndcg, hr = [], []
    for per_rank, tied_rows in zip(counts, spread, strict=True):  # one pass per group over k_max ranks
        dcg, hits, dcg_at, hits_at = Fraction(0), 0, [], []
        for count, gain in zip(per_rank, gains, strict=True):
            dcg += count * gain
            hits += count
            dcg_at.append(dcg)
            hits_at.append(hits)
        group_ndcg, group_hr = [], []
        for k in ks:
            dcg_k, hits_k = dcg_at[k - 1], Fraction(hits_at[k - 1])
            for b, t, n in tied_rows:
                first, last = min(b, k), min(b + t + 1, k)  # the places below k it can take: first..last-1
                dcg_k += n * (upto[last] - upto[first]) / (t + 1)
                hits_k += Fraction(n * (last - first), t + 1)
            group_ndcg.append(float(dcg_k) / rows)
            group_hr.append(float(hits_k / rows))
        ndcg.append(group_ndcg)
        hr.append(group_hr)
    return ndcg, hr


def ndcg_hr(ranks: Ranks | torch.Tensor, topk: Sequence[int] = TOPK) -> dict[str, list[float]]:
    """Expected NDCG@K (gain 1/log2(rank+2) if rank < K) and HR@K (rank < K) under random
    tie-breaking, averaged over rows, in topk order."""
    ranks = as_ranks(ranks)
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D [rows], got shape {tuple(ranks.shape)}")
    ndcg, hr = ndcg_hr_many(Ranks(ranks.better.unsqueeze(0), ranks.tied.unsqueeze(0)), topk)
    return {"NDCG": ndcg[0], "HR": hr[0]}
