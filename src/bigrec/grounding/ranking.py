"""Ranking the whole catalogue for a generation: L2 distances of embeddings, beams first.

Step 2 of BIGRec ("grounding"): a generation's embedding is compared with every item's, the
nearest item ranks first. Rows of constrained decoding already name their items and rank them
first (:func:`rank_with_beams`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bigrec.evaluation.metrics import Ranks, miss_rank, target_ranks
from bigrec.evaluation.results import Results, need_histories
from bigrec.grounding.embedding import Embedder


def rank_with_beams(beam_items: Sequence[Sequence[int]], dist: torch.Tensor) -> torch.Tensor:
    """[R, N] distances that rank each row's beam items first, in beam order, then the rest by ``dist``.

    ``beam_items[r]`` lists row ``r``'s item ids in beam order (all ids of a beam's title, one
    after the other; an id seen again is ignored). The other items keep their ``dist`` values;
    the beam items get values below the row's smallest finite distance, 1 apart, so ascending
    order gives beams first. To re-weight by popularity or CI, re-weight ``dist`` first, then
    call this: the beams stay first and the tail is ordered by the re-weighted distance.
    """
    if len(beam_items) != dist.shape[0]:
        raise ValueError(f"{len(beam_items)} rows of beam items for a distance matrix of {dist.shape[0]} rows")
    out = dist.clone()
    finite = torch.isfinite(dist)
    row_min = torch.where(finite, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    row_min = torch.where(torch.isfinite(row_min), row_min, torch.zeros_like(row_min))
    rows, cols, vals = [], [], []
    for r, items in enumerate(beam_items):
        ordered = list(dict.fromkeys(int(i) for i in items))
        if ordered and not 0 <= min(ordered) <= max(ordered) < dist.shape[1]:
            raise ValueError(f"row {r}: beam item ids {ordered} outside 0..{dist.shape[1] - 1}")
        k = len(ordered)
        rows += [r] * k
        cols += ordered
        vals += [float(row_min[r]) - (k - j) for j in range(k)]
    if rows:
        out[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(vals, dtype=out.dtype)
    return out


def l2_distances(queries: torch.Tensor, items: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """L2 distance of every query [R, D] to every item [N, D] -> [R, N] float32, in row chunks."""
    if queries.dim() != 2 or items.dim() != 2 or queries.shape[1] != items.shape[1]:
        raise ValueError(f"need [R, D] and [N, D], got {tuple(queries.shape)} and {tuple(items.shape)}")
    items = items.float()
    out = torch.empty(queries.shape[0], items.shape[0], dtype=torch.float32)
    for lo in range(0, queries.shape[0], chunk_rows):
        out[lo : lo + chunk_rows] = torch.cdist(queries[lo : lo + chunk_rows].float(), items, p=2)
    return out


def ground(texts: list[str], targets: list[list[int]], items: torch.Tensor, embed: Embedder,
           exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, Ranks, torch.Tensor]:
    """L2 distances [R, N] of each text to every item, the targets' ranks [R] and the empty mask [R].

    An empty text is a miss: its rank is beyond the catalogue and every K. ``exclude`` [R, N]:
    items left out of the ranking.
    """
    dist = l2_distances(embed(texts), items)
    ranks = target_ranks(dist, targets, exclude=exclude)
    empty = torch.tensor([not t for t in texts])
    ranks[empty] = miss_rank(items.shape[0])
    return dist, ranks, empty



def nearest_beam_distances(beams: list[list[str]], items: torch.Tensor, embed: Embedder,
                           count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances [R, N] of each item to the nearest of a row's first ``count`` non-empty beams, and
    the mask [R] of rows with none.

    Beam b's distances are offset by b * 1e-6 of the row's distance scale, so an item that is
    exactly a beam's title ranks in beam order, ahead of everything that is no beam at all.
    """
    rows = len(beams)
    best = torch.full((rows, items.shape[0]), float("inf"))
    for b in range(count):
        texts = [row[b] if b < len(row) else "" for row in beams]
        dist = l2_distances(embed(texts), items)
        dist += b * 1e-6 * dist.amax(1, keepdim=True)
        dist[torch.tensor([not t for t in texts])] = float("inf")
        best = torch.minimum(best, dist)
    empty = torch.isinf(best).all(1)
    best[empty] = 0.0  # misses whatever their distances; finite for the re-weighting's min-max
    return best, empty



def ground_results(results: Results, items: torch.Tensor, embed: Embedder, exclude: torch.Tensor | None = None,
                   beams: int = 1) -> tuple[torch.Tensor, Ranks, torch.Tensor, list[list[int]] | None]:
    """:func:`ground` of the top generations (with ``beams`` > 1, of the nearest of the first
    ``beams``); rows with ``predict_ids`` rank their beams' items first.

    Returns distances [R, N], ranks [R], the empty mask [R] (a row with beam ids is never
    empty) and the beam items per row (None when no row has any; excluded items dropped).
    """
    if beams > 1:
        dist, empty = nearest_beam_distances(results.beams, items, embed, beams)
        ranks = target_ranks(dist, results.targets, exclude=exclude)
        ranks[empty] = miss_rank(items.shape[0])
    else:
        dist, ranks, empty = ground(results.top1, results.targets, items, embed, exclude)
    if not any(results.has_ids or []):
        return dist, ranks, empty, None
    first = results.first if exclude is None else [
        [i for i in ids if not exclude[r, i]] for r, ids in enumerate(results.first)]
    has = torch.tensor(results.has_ids)
    ranks = target_ranks(rank_with_beams(first, dist), results.targets, exclude=exclude).where(has, ranks)
    return dist, ranks, empty & ~has, first



def last_title_ranks(results: Results, items: torch.Tensor, exclude: torch.Tensor | None) -> Ranks:
    """Ranks [R] of the content baseline: every item by L2 distance to the row's last history title.

    The index row of that item is the title embedded exactly as a generation of it would be.
    A row with no history is a miss.
    """
    histories = need_histories(results, "--last_title")
    last = torch.tensor([h[-1] if h else 0 for h in histories])
    ranks = target_ranks(l2_distances(items[last], items), results.targets, exclude=exclude)
    ranks[torch.tensor([not h for h in histories])] = miss_rank(items.shape[0])
    return ranks
