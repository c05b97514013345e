"""Likelihood + SASRec: BIGRec's collaborative-information step over a likelihood ranking.

A likelihood ranking (``bigrec generate --decoding likelihood``) names its top M titles with their
log-probabilities (``predict_ids``, ``predict_scores``); generation with ``--cf_scores`` also scores
SASRec's top M titles for the row exactly (``cf_ids``, ``cf_logp``). Per row, every item of the
union of those titles (the candidates) scores

    log p(title | prompt) + w * s(item) + c * t(item),

where s is SASRec's score for the row min-max normalised to [0, 1] over the whole catalogue, as the
CI step normalises it (:func:`bigrec.grounding.reweighting.minmax_rows`), and log p is the score the
likelihood ranking ranks by (its prior applied). A title in both lists keeps the likelihood
ranking's score, so with w = 0 the language model's candidates keep their plain likelihood order.
t is the content term: minus each item's L2 distance to the row's last history title (the grounding
embedding, as the last-title baseline ranks), min-max normalised the same way; on Amazon, where titles
carry the signal, the last title alone beats SASRec. Every other item ranks below every candidate, by
SASRec's score. w and c are chosen together on validation rows from :data:`WEIGHT_GRID` and
:data:`CONTENT_GRID` by NDCG@10 (the fewer terms on a tie): a weight of 0 says validation dropped its term.

Pure maths on tensors and lists: :func:`candidates_of` reads a result row, :func:`blend_scores` gives the
[R, N] scores (higher is better), :func:`blend_ranks` the targets' ranks for many weights at once,
:func:`choose_weights` the weights, :func:`top_items` a row's ranking (what ``recommend`` and ``serve``
answer with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bigrec.evaluation.metrics import Ranks, Targets, ndcg_hr_many, target_ranks
from bigrec.grounding.ranking import l2_distances
from bigrec.grounding.reweighting import minmax_rows

# SASRec's weight against the log-probabilities (nats); 0 = plain likelihood ranking.
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# the content term's weight (the last history title); 0 = no content term
CONTENT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class Candidates:
    """One row's candidate titles: each title's item ids and its log-probability (likelihood score)."""

    ids: list[list[int]]
    logp: list[float]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.logp):
            raise ValueError(f"{len(self.ids)} titles but {len(self.logp)} log-probabilities")


def merge(lm_ids: Sequence[Sequence[int]], lm_logp: Sequence[float], cf_ids: Sequence[Sequence[int]],
          cf_logp: Sequence[float]) -> Candidates:
    """The union of the language model's titles and SASRec's: the LM's first with their scores, then
    SASRec's titles that the LM did not name (a title is known by its item ids)."""
    ids, logp = [[int(i) for i in t] for t in lm_ids], [float(v) for v in lm_logp]
    seen = {i for title in ids for i in title}
    for title, value in zip(cf_ids, cf_logp, strict=True):
        title = [int(i) for i in title]
        if not seen.intersection(title):
            ids.append(title)
            logp.append(float(value))
            seen.update(title)
    return Candidates(ids, logp)


def candidates_of(row: dict) -> Candidates | None:
    """A result row's candidates (``predict_ids``/``predict_scores`` and ``cf_ids``/``cf_logp``);
    None for a row generated without SASRec's candidates."""
    if row.get("cf_ids") is None:
        return None
    return merge(row["predict_ids"], row["predict_scores"], row["cf_ids"], row["cf_logp"])


def blend_scores(candidates: Sequence[Candidates], sasrec: torch.Tensor, weight: float,
                 content: torch.Tensor | None = None, content_weight: float = 0.0) -> torch.Tensor:
    """[R, N] float64 scores, higher is better: ``logp + weight * minmax(s) + content_weight *
    minmax(content)`` on each row's candidates; every other item below the row's worst candidate, in
    SASRec's order. ``content``: [R, N] content scores, higher is better (:func:`last_title_content`)."""
    if sasrec.dim() != 2 or sasrec.shape[0] != len(candidates):
        raise ValueError(f"SASRec scores {tuple(sasrec.shape)} for {len(candidates)} rows of candidates")
    if weight < 0 or content_weight < 0:
        raise ValueError(f"weights must be at least 0, got {weight} and {content_weight}")
    if content_weight and (content is None or content.shape != sasrec.shape):
        raise ValueError("a content weight needs content scores of SASRec's shape")
    s = minmax_rows(sasrec.double())
    t = minmax_rows(content.double()) if content_weight else None
    out = torch.empty_like(s)
    for r, cand in enumerate(candidates):  # a few dozen ids per row
        rows = [i for title in cand.ids for i in title]
        if not rows:
            out[r] = s[r]
            continue
        if not 0 <= min(rows) <= max(rows) < s.shape[1]:
            raise ValueError(f"row {r}: candidate ids outside the catalogue (0..{s.shape[1] - 1})")
        ids = torch.tensor(rows)
        logp = torch.tensor([v for title, v in zip(cand.ids, cand.logp, strict=True) for _ in title],
                            dtype=torch.float64)
        value = logp + weight * s[r, ids]
        if t is not None:
            value = value + content_weight * t[r, ids]
        out[r] = s[r] + (value.min() - 2.0)  # in [worst - 2, worst - 1]: below every candidate
        out[r, ids] = value
    return out


def blend_ranks(candidates: Sequence[Candidates], sasrec: torch.Tensor, targets: Targets,
                weights: Sequence[float], exclude: torch.Tensor | None = None, content: torch.Tensor | None = None,
                content_weight: float = 0.0) -> Ranks:
    """Target ranks [W, R] under :func:`blend_scores` for every weight (ties counted as ties)."""
    return Ranks.stack([target_ranks(blend_scores(candidates, sasrec, w, content, content_weight), targets,
                                     higher_is_better=True, exclude=exclude) for w in weights])


def choose_weights(candidates: Sequence[Candidates], sasrec: torch.Tensor, targets: Targets,
                   grid: Sequence[float] = WEIGHT_GRID, exclude: torch.Tensor | None = None,
                   content: torch.Tensor | None = None,
                   content_grid: Sequence[float] = CONTENT_GRID) -> tuple[float, float, list[list[float]]]:
    """(SASRec's weight, the content weight, NDCG@10 [content weight][weight]) with the best NDCG@10
    on these (validation) rows; on a tie the smaller content weight, then the smaller weight. Without
    ``content`` the content grid is (0,)."""
    content_grid = content_grid if content is not None else (0.0,)
    ndcg = [[row[0] for row in ndcg_hr_many(blend_ranks(candidates, sasrec, targets, grid, exclude, content, c),
                                            (10,))[0]] for c in content_grid]
    ci, wi = max(((c, w) for c in range(len(content_grid)) for w in range(len(grid))),
                 key=lambda cw: (ndcg[cw[0]][cw[1]], -float(content_grid[cw[0]]), -float(grid[cw[1]])))
    return float(grid[wi]), float(content_grid[ci]), ndcg


def last_title_content(histories: Sequence[Sequence[int]], items: torch.Tensor) -> torch.Tensor:
    """[R, N] content scores, higher is better: minus each item's L2 distance to the row's last
    history item in the item index ``items`` [N, D] (the last-title baseline's measure); a row with
    no history scores every item 0."""
    last = torch.tensor([h[-1] if h else 0 for h in histories], dtype=torch.long)
    out = -l2_distances(items[last], items)
    out[torch.tensor([not h for h in histories], dtype=torch.bool)] = 0.0
    return out


def top_items(candidates: Candidates, sasrec: torch.Tensor, weight: float, k: int,
              excluded: Sequence[int] = (), content: torch.Tensor | None = None,
              content_weight: float = 0.0) -> list[tuple[int, float]]:
    """A row's ``k`` best (item id, blended score) under :func:`blend_scores`, ``excluded`` ids left
    out; ties go to the lower id. ``sasrec``, ``content``: the row's scores [N]."""
    score = blend_scores([candidates], sasrec[None], weight, None if content is None else content[None],
                         content_weight)[0]
    if excluded:
        score[torch.tensor(sorted(set(excluded)))] = float("-inf")
    order = torch.argsort(-score, stable=True)[:k].tolist()
    return [(i, float(score[i])) for i in order if score[i] != float("-inf")]
