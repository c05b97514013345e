"""Step 2 maths: re-weighting by statistical information (popularity, a conventional model), with the gamma search.

The paper ranks items by ``d' = d * (1 + s) ** (-gamma)`` after per-row min-max normalisation
of the distance d and of a score s (popularity, or a conventional model's score), with gamma
picked on validation per metric@K. Evaluating ~200 gammas by brute force would redo a
[rows, items] pass per gamma; instead, in log space an item beats the target exactly on an
open interval of gamma, so one pass finds, for every (row, item), the grid slice where it
wins, and a cumulative sum gives the target's rank at every gamma at once.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bigrec.evaluation.metrics import (
    TOPK,
    Ranks,
    Targets,
    ndcg_hr_many,
    target_index,
    target_ranks,
)
from bigrec.io import InputError

# Weight of the other model in :func:`blend_ranks`: 0 (distance alone) to 0.95, never the other model alone.
BLEND_GRID: tuple[float, ...] = tuple(round(i / 20, 2) for i in range(20))

# 0.01..1.00 step 0.01, then 2..99: the paper's grid.
GAMMA_GRID: tuple[float, ...] = tuple(round(i / 100, 2) for i in range(1, 101)) + tuple(
    float(i) for i in range(2, 100))

_BLOCK = 1 << 22  # elements of one [rows, items] block in the float64 search (~32 MB per temp)


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-row (last dim) min-max to [0, 1]; a constant row becomes zeros rather than NaN."""
    x = x if x.is_floating_point() else x.float()
    low = x.amin(-1, keepdim=True)
    span = x.amax(-1, keepdim=True) - low
    return (x - low) / torch.where(span > 0, span, torch.ones_like(span))


def reweight(dist: torch.Tensor, scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """``minmax(d) * (1 + minmax(s)) ** (-gamma)``; a 1-D score vector (popularity) serves every row."""
    _check_scores(dist, scores)
    return minmax_rows(dist) * (1 + minmax_rows(scores)) ** (-gamma)


def popularity_counts(train_item_ids: Iterable[int] | torch.Tensor, num_items: int) -> torch.Tensor:
    """Interactions per catalogue item in the training split -> [N] int64."""
    ids = torch.as_tensor(train_item_ids if isinstance(train_item_ids, torch.Tensor) else list(train_item_ids),
                          dtype=torch.long).flatten()
    if ids.numel() and (ids.min() < 0 or ids.max() >= num_items):
        raise ValueError(f"item ids must lie in [0, {num_items}), got {ids.min()}..{ids.max()}")
    return torch.bincount(ids, minlength=num_items)


def _check_scores(dist: torch.Tensor, scores: torch.Tensor) -> None:
    if dist.dim() != 2:
        raise ValueError(f"dist must be [rows, items], got shape {tuple(dist.shape)}")
    if scores.shape not in (dist.shape, dist.shape[1:]):
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not match distances "
                         f"{tuple(dist.shape)}: need [rows, items] or [items]")


def _thresholds(a: torch.Tensor, b: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For target column ``col`` [C, 1]: threshold [C, N] and whether the item wins above it.

    Item j beats the target iff a_j - a_t < g * (b_j - b_t). With db > 0 it wins for g above
    da / db, with db < 0 below it. db == 0 is +0.0 here (b >= 0), so da / db is -inf (always
    wins), +inf (never) or NaN for da == 0, a tie, which is mapped to +inf (never).
    """
    a_t = a.gather(1, col)
    da = a - torch.where(torch.isinf(a_t), torch.zeros_like(a_t), a_t)  # targets at d=0 are handled by the caller
    db = b - b.gather(1, col)
    return (da / db).nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf")), db >= 0


def _same(a: torch.Tensor, b: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Where (a, b) equals (a_t, b_t), or both a are -inf (minmax distance 0): level at every gamma."""
    return ((a == a_t) & (b == b_t)) | (torch.isinf(a) & torch.isinf(a_t))


def _level_counts(a: torch.Tensor, b: torch.Tensor, cols: torch.Tensor, live: torch.Tensor, counted: torch.Tensor,
                  grid: torch.Tensor) -> torch.Tensor:
    """Items level with the row's best target id at every gamma of ``grid`` -> [C, G].

    An item whose (a, b) equals a target id's (or that, like it, lies at minmax distance 0) has
    the same re-weighted distance at every gamma; it ties the target wherever that id is the
    best of the target's ids. Items only level at one isolated gamma (a crossing that falls
    exactly on a grid point) are not counted: the interval search does not see them either.
    ``live`` [C, M] marks real target ids, ``counted`` [C, N] the items that are ranked here.
    """
    rows, num_items = a.shape
    own = torch.zeros(rows, num_items, dtype=torch.long).scatter_add_(1, cols, live.long()) > 0
    others = counted * (~own).long()  # ranked items that are not one of the target's ids
    a_t, b_t = a.gather(1, cols), b.gather(1, cols)  # [C, M]
    if cols.shape[1] == 1:
        return (_same(a, b, a_t, b_t).long() * others).sum(1, keepdim=True).expand(rows, len(grid))
    level = (a_t.unsqueeze(2) - grid * b_t.unsqueeze(2)).masked_fill_(~live.unsqueeze(2), float("inf"))  # [C, M, G]
    best = (level == level.amin(1, keepdim=True)) & live.unsqueeze(2)
    out = torch.zeros(rows, len(grid), dtype=torch.long)
    for m in range(cols.shape[1]):  # one pass per target id column
        earlier = (_same(a_t[:, :m], b_t[:, :m], a_t[:, m : m + 1], b_t[:, m : m + 1]) & live[:, :m]).any(1)
        if m and bool(earlier.all()):
            continue  # every row has counted this id's level items already
        count = (_same(a, b, a_t[:, m : m + 1], b_t[:, m : m + 1]).long() * others).sum(1)  # [C]
        out += torch.where(best[:, m] & ~earlier.unsqueeze(1), count.unsqueeze(1), 0)
    return out


def _first_items(first: Sequence[Sequence[int]], idx: torch.Tensor, mask: torch.Tensor,
                 num_items: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows' leading items as a mask [R, N], their count [R] and the target's place among them [R] (-1: not there)."""
    rows = idx.shape[0]
    if len(first) != rows:
        raise ValueError(f"{len(first)} rows of leading items for {rows} rows")
    ahead = torch.zeros(rows, num_items, dtype=torch.bool)
    lead = torch.zeros(rows, dtype=torch.long)
    place = torch.full((rows,), -1, dtype=torch.long)
    for r, items in enumerate(first):  # building the index: a few ids per row
        ordered = list(dict.fromkeys(int(i) for i in items))
        if ordered and not 0 <= min(ordered) <= max(ordered) < num_items:
            raise ValueError(f"row {r}: leading item ids {ordered} outside 0..{num_items - 1}")
        wanted = set(idx[r][mask[r]].tolist())
        ahead[r, ordered] = True
        lead[r] = len(ordered)
        place[r] = next((j for j, i in enumerate(ordered) if i in wanted), -1)
    return ahead, lead, place


def grid_ranks(dist: torch.Tensor, scores: torch.Tensor, targets: Targets, gammas: Sequence[float],
               first: Sequence[Sequence[int]] | None = None, exclude: torch.Tensor | None = None) -> Ranks:
    """Target ranks under ``reweight(dist, scores, g)`` for every g in ``gammas`` -> :class:`Ranks` [G, R].

    ``first`` (per row, item ids in order; constrained beams) ranks those items ahead of all
    others, as :func:`bigrec.grounding.ranking.rank_with_beams` does on the re-weighted distances: a
    target among them has its place there at every gamma; otherwise its rank is their count
    plus the re-weighted count over the other items. ``exclude`` [R, N]
    (:func:`bigrec.evaluation.metrics.seen_mask`): items left out of the ranking (still part of the
    min-max normalisation, which the paper defines over the whole catalogue).

    With a = log minmax(d) and b = log(1 + minmax(s)), item j beats target t exactly for g in
    an open interval (see :func:`_thresholds`); with several target ids it must beat all of
    them, an intersection of intervals. Each item adds +1 where its interval starts on the
    sorted grid and -1 where it ends, and a cumulative sum gives the counts. Computed in
    float64 (more exact than a float32 brute force, which underflows at large gamma); the two
    can differ only on near-ties. Ties are the items level with the target at every gamma
    (:func:`_level_counts`).
    """
    _check_scores(dist, scores)
    if torch.isnan(dist).any() or torch.isnan(scores).any():
        raise ValueError("distances or scores contain NaN")
    rows, num_items = dist.shape
    if exclude is not None and exclude.shape != dist.shape:
        raise ValueError(f"exclude mask {tuple(exclude.shape)} does not match {tuple(dist.shape)}")
    idx, mask = target_index(targets, rows, num_items)  # padding repeats an id: harmless here
    ahead = lead = place = None
    if first is not None:
        ahead, lead, place = _first_items(first, idx, mask, num_items)
    order = sorted(range(len(gammas)), key=lambda i: gammas[i])
    grid = torch.tensor([float(gammas[i]) for i in order], dtype=torch.float64)
    n_grid, inf = len(order), float("inf")
    log_w = minmax_rows(scores.double()).log1p() if scores.dim() == 1 else None  # [N] in [0, log 2]
    ranks = torch.empty(rows, n_grid, dtype=torch.long)
    tied = torch.empty(rows, n_grid, dtype=torch.long)
    step = max(1, _BLOCK // max(num_items, 1))
    for lo in range(0, rows, step):  # row chunks bound memory; no per-row Python work
        a = minmax_rows(dist[lo : lo + step].double()).log_()  # [C, N], -inf at the nearest item
        b = log_w.expand_as(a) if log_w is not None else minmax_rows(scores[lo : lo + step].double()).log1p_()
        cols = idx[lo : lo + step]
        counted = torch.ones_like(a, dtype=torch.long) if ahead is None else (~ahead[lo : lo + step]).long()
        if exclude is not None:
            counted = counted * (~exclude[lo : lo + step]).long()
        diff = torch.zeros(a.shape[0], n_grid + 1, dtype=torch.long)  # last column absorbs "never"
        if cols.shape[1] == 1:  # one id: each item has a single bound, one search
            thr, up = _thresholds(a, b, cols)
            at = torch.searchsorted(grid, torch.where(up, thr.nextafter(torch.tensor(inf, dtype=thr.dtype)), thr))
            diff.scatter_add_(1, at, (up.long() * 2 - 1) * counted)  # +1 from the first g > thr; -1 from g >= thr
            diff[:, 0] += ((~up).long() * counted).sum(1)  # items winning below a bound win from the start
        else:
            low, high = torch.full_like(a, -inf), torch.full_like(a, inf)
            for m in range(cols.shape[1]):  # one pass per target id column
                thr, up = _thresholds(a, b, cols[:, m : m + 1])
                low = torch.maximum(low, torch.where(up, thr, -inf))
                high = torch.minimum(high, torch.where(up, inf, thr))
            start = torch.searchsorted(grid, low.nextafter_(torch.tensor(inf, dtype=low.dtype)))
            end = torch.maximum(torch.searchsorted(grid, high), start)
            diff.scatter_add_(1, start, counted).scatter_add_(1, end, -counted)
        block = diff[:, :n_grid].cumsum(1)
        block[torch.isinf(a.gather(1, cols)).any(1)] = 0  # a target at minmax distance 0: nothing beats it
        level = _level_counts(a, b, cols, mask[lo : lo + step], counted, grid)
        if ahead is not None:
            hit = place[lo : lo + step, None]
            block = torch.where(hit >= 0, hit, block + lead[lo : lo + step, None])
            level = torch.where(hit >= 0, 0, level)  # leading items have distinct places
        ranks[lo : lo + step] = block
        tied[lo : lo + step] = level
    back = torch.empty(n_grid, dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(n_grid)
    return Ranks(ranks[:, back].T.contiguous(), tied[:, back].T.contiguous())


@dataclass(frozen=True)
class GammaSearch:
    """Gammas chosen on validation and the validation metrics (plain lists, JSON-ready)."""

    topk: tuple[int, ...]
    grid: tuple[float, ...]
    ndcg_gamma: dict[int, float]  # K -> gamma maximising validation NDCG@K
    hr_gamma: dict[int, float]  # K -> gamma maximising validation HR@K
    single_k: int
    single_gamma: float  # gamma maximising validation NDCG@single_k, used for every K
    valid_tuned: dict[str, list[float]]  # best NDCG@K / HR@K, each at its own gamma
    valid_single: dict[str, list[float]]  # metrics at single_gamma
    valid_grid: dict[str, list[list[float]]]  # [G][len(topk)] metrics for every grid gamma

    def to_dict(self) -> dict:
        return asdict(self)


def _argmax_first(values: list[float]) -> int:
    """Index of the maximum; ties go to the earliest (smallest gamma)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def search_gamma(dist_valid: torch.Tensor, scores_valid: torch.Tensor, targets_valid: Targets,
                 topk: Sequence[int] = TOPK, grid: Sequence[float] = GAMMA_GRID, *,
                 single_k: int = 10, first: Sequence[Sequence[int]] | None = None,
                 exclude: torch.Tensor | None = None) -> GammaSearch:
    """Pick gamma per metric@K, and one gamma by NDCG@single_k, on the validation rows.

    ``first``: per row, items ranked ahead of the rest (constrained beams; see :func:`grid_ranks`).
    """
    topk, grid = tuple(int(k) for k in topk), tuple(sorted(float(g) for g in set(grid)))
    if single_k not in topk:
        raise ValueError(f"single_k={single_k} is not in topk {list(topk)}")
    ndcg, hr = ndcg_hr_many(grid_ranks(dist_valid, scores_valid, targets_valid, grid, first, exclude), topk)
    ndcg_best = [_argmax_first([row[j] for row in ndcg]) for j in range(len(topk))]
    hr_best = [_argmax_first([row[j] for row in hr]) for j in range(len(topk))]
    single = _argmax_first([row[topk.index(single_k)] for row in ndcg])
    return GammaSearch(
        topk=topk, grid=grid,
        ndcg_gamma={k: grid[g] for k, g in zip(topk, ndcg_best, strict=True)},
        hr_gamma={k: grid[g] for k, g in zip(topk, hr_best, strict=True)},
        single_k=single_k, single_gamma=grid[single],
        valid_tuned={"NDCG": [ndcg[g][j] for j, g in enumerate(ndcg_best)],
                     "HR": [hr[g][j] for j, g in enumerate(hr_best)]},
        valid_single={"NDCG": ndcg[single], "HR": hr[single]},
        valid_grid={"NDCG": ndcg, "HR": hr},
    )


def apply_gamma(dist_test: torch.Tensor, scores_test: torch.Tensor, targets_test: Targets,
                search: GammaSearch, first: Sequence[Sequence[int]] | None = None,
                exclude: torch.Tensor | None = None) -> dict:
    """Test metrics with each metric@K at its own tuned gamma, and with the single gamma.

    ``first``: per row, items ranked ahead of the rest (constrained beams; see :func:`grid_ranks`).

    Returns ``{"topk", "tuned": {"NDCG", "HR"}, "single": {"NDCG", "HR"}, "gammas": {"NDCG": [...],
    "HR": [...], "single": g}, "single_ranks": [R] tensor}``: plain lists and floats, and the
    per-row ranks at the single gamma (for confidence intervals).
    """
    topk = search.topk
    gammas = sorted({*search.ndcg_gamma.values(), *search.hr_gamma.values(), search.single_gamma})
    ranks = grid_ranks(dist_test, scores_test, targets_test, gammas, first, exclude)  # [G, R]
    ndcg, hr = ndcg_hr_many(ranks, topk)

    def at(g: float) -> int:
        return bisect.bisect_left(gammas, g)

    return {
        "topk": list(topk),
        "tuned": {"NDCG": [ndcg[at(search.ndcg_gamma[k])][j] for j, k in enumerate(topk)],
                  "HR": [hr[at(search.hr_gamma[k])][j] for j, k in enumerate(topk)]},
        "single": {"NDCG": ndcg[at(search.single_gamma)], "HR": hr[at(search.single_gamma)]},
        "gammas": {"NDCG": [search.ndcg_gamma[k] for k in topk], "HR": [search.hr_gamma[k] for k in topk],
                   "single": search.single_gamma},
        "single_ranks": ranks[at(search.single_gamma)],
    }


def blend(dist: torch.Tensor, scores: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - w) * minmax(d) - w * minmax(s)``, lower is better (see :func:`blend_ranks`)."""
    _check_scores(dist, scores)
    return (1 - weight) * minmax_rows(dist) - weight * minmax_rows(scores)


def blend_ranks(dist: torch.Tensor, scores: torch.Tensor, targets: Targets, weights: Sequence[float],
                exclude: torch.Tensor | None = None) -> Ranks:
    """Target ranks [W, R] under ``(1 - w) * minmax(d) - w * minmax(s)`` for every w in ``weights``.

    A variant of the paper's re-weighting, reported beside it, never in its place. The paper's
    ``minmax(d) * (1 + minmax(s)) ** (-gamma)`` gives the item nearest to the generation 0, so
    it stays first at every gamma; a weighted sum lets the other model's score outrank it too.
    With w below 1 the grounding always keeps a say.
    """
    _check_scores(dist, scores)
    d, s = minmax_rows(dist.double()), minmax_rows(scores.double())
    return Ranks.stack([target_ranks((1 - w) * d - w * s, targets, exclude=exclude) for w in weights])


def _keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x[keep] if x.dim() == 2 else x  # a popularity vector serves every row



def _scaled(metrics: dict[str, list[float]], factor: float) -> dict[str, list[float]]:
    return {key: [v * factor for v in values] for key, values in metrics.items()}



def popularity_scores(spec: str | Path, num_items: int) -> torch.Tensor:
    """Training counts [N] of each target item in ``train.csv`` (a file, or the folder holding it)."""
    import pandas as pd

    path = Path(spec)
    path = path / "train.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"popularity: training split not found: {path}")
    try:
        ids = pd.read_csv(path, usecols=["item_id"])["item_id"]
    except ValueError as exc:
        raise InputError(f"{path}: cannot read column 'item_id': {exc}") from exc
    if ids.isna().any():
        raise InputError(f"{path}: column 'item_id' has {int(ids.isna().sum())} empty values")
    try:
        return popularity_counts(torch.tensor(ids.to_numpy(dtype="int64")), num_items).float()
    except ValueError as exc:
        raise InputError(f"{path}: column 'item_id': {exc} (is this the catalogue's training split?)") from exc



def _rows(x: list, keep: torch.Tensor) -> list:
    return [v for v, k in zip(x, keep.tolist(), strict=True) if k]



def reweighted(dist: torch.Tensor, empty: torch.Tensor, scores: torch.Tensor, targets: list[list[int]],
               valid_dist: torch.Tensor, valid_empty: torch.Tensor, valid_scores: torch.Tensor,
               valid_targets: list[list[int]], first: list[list[int]] | None = None,
               valid_first: list[list[int]] | None = None, exclude: torch.Tensor | None = None,
               valid_exclude: torch.Tensor | None = None) -> dict:
    """Gamma searched on validation, applied to test; empty generations stay misses.

    ``first`` / ``valid_first``: per row, constrained beams' items, ranked ahead of the rest at
    every gamma; ``exclude`` / ``valid_exclude`` [R, N]: items left out of the ranking. Returns
    :func:`bigrec.grounding.reweighting.apply_gamma`'s dict plus the validation metrics; ``single_ranks`` [R]
    covers every test row (empty rows as misses).
    """
    keep, valid_keep = ~empty, ~valid_empty

    def kept(x: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else x[k]

    if not valid_keep.any():
        raise InputError("every top generation of the validation results is empty; cannot choose gamma")
    search = search_gamma(valid_dist[valid_keep], _keep(valid_scores, valid_keep), _rows(valid_targets, valid_keep),
                          TOPK, GAMMA_GRID, first=None if valid_first is None else _rows(valid_first, valid_keep),
                          exclude=kept(valid_exclude, valid_keep))
    single_ranks = Ranks.miss(len(keep), dist.shape[1])
    if keep.any():
        out = apply_gamma(dist[keep], _keep(scores, keep), _rows(targets, keep), search,
                          first=None if first is None else _rows(first, keep), exclude=kept(exclude, keep))
        single_ranks[keep] = out["single_ranks"]
    else:
        zeros = {"NDCG": [0.0] * len(TOPK), "HR": [0.0] * len(TOPK)}
        out = {"tuned": zeros, "single": zeros, "gammas": {"NDCG": [search.ndcg_gamma[k] for k in TOPK],
                                                           "HR": [search.hr_gamma[k] for k in TOPK],
                                                           "single": search.single_gamma}}
    share, valid_share = int(keep.sum()) / len(keep), int(valid_keep.sum()) / len(valid_keep)
    blend = None
    if first is None and valid_first is None:  # constrained rows rank their beams first: no blend
        valid_ndcg = ndcg_hr_many(blend_ranks(valid_dist[valid_keep], _keep(valid_scores, valid_keep),
                                              _rows(valid_targets, valid_keep), BLEND_GRID,
                                              kept(valid_exclude, valid_keep)), (10,))[0]
        best = max(range(len(BLEND_GRID)), key=lambda i: (valid_ndcg[i][0], -i))
        blend = {"weight": BLEND_GRID[best], "valid_ndcg10": valid_ndcg[best][0] * valid_share,
                 "ranks": single_ranks.clone()}
        if keep.any():
            blend["ranks"][keep] = blend_ranks(dist[keep], _keep(scores, keep), _rows(targets, keep),
                                               [BLEND_GRID[best]], kept(exclude, keep))[0]
    return {"tuned": _scaled(out["tuned"], share), "single": _scaled(out["single"], share),
            "single_ranks": single_ranks, "blend": blend, "gammas": out["gammas"], "single_k": search.single_k,
            "valid_tuned": _scaled(search.valid_tuned, valid_share),
            "valid_single": _scaled(search.valid_single, valid_share)}
