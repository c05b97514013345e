"""Likelihood + SASRec: BIGRec's collaborative-information step over a likelihood ranking.

A likelihood ranking (``bigrec generate --decoding likelihood``) names its top M titles with their
log-probabilities (``predict_ids``, ``predict_scores``); generation with ``--cf_scores`` also scores
SASRec's top M titles for the row exactly (``cf_ids``, ``cf_logp``). Per row, every item of the
union of those titles (the candidates) scores

    log p(title | prompt) + w * s(item),

where s is SASRec's score for the row min-max normalised to [0, 1] over the whole catalogue, as the
CI step normalises it (:func:`bigrec.grounding.reweighting.minmax_rows`), and log p is the score the
likelihood ranking ranks by (its prior applied). A title in both lists keeps the likelihood
ranking's score, so with w = 0 the language model's candidates keep their plain likelihood order.
Every other item ranks below every candidate, by SASRec's score. w is chosen on validation rows from
:data:`WEIGHT_GRID` by NDCG@10.

Pure maths on tensors and lists: :func:`candidates_of` reads a result row, :func:`blend_scores` gives the
[R, N] scores (higher is better), :func:`blend_ranks` the targets' ranks for many weights at once,
:func:`choose_weight` the weight, :func:`top_items` a row's ranking (what ``recommend`` and ``serve``
answer with).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bigrec.evaluation.metrics import Ranks, Targets, ndcg_hr_many, target_ranks
from bigrec.grounding.reweighting import minmax_rows

# SASRec's weight against the log-probabilities (nats); 0 = plain likelihood ranking.
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


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


def blend_scores(candidates: Sequence[Candidates], sasrec: torch.Tensor, weight: float) -> torch.Tensor:
    """[R, N] float64 scores, higher is better: ``logp + weight * minmax(s)`` on each row's
    candidates; every other item below the row's worst candidate, in SASRec's order."""
    if sasrec.dim() != 2 or sasrec.shape[0] != len(candidates):
        raise ValueError(f"SASRec scores {tuple(sasrec.shape)} for {len(candidates)} rows of candidates")
    if weight < 0:
        raise ValueError(f"weight must be at least 0, got {weight}")
    s = minmax_rows(sasrec.double())
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
        out[r] = s[r] + (value.min() - 2.0)  # in [worst - 2, worst - 1]: below every candidate
        out[r, ids] = value
    return out


def blend_ranks(candidates: Sequence[Candidates], sasrec: torch.Tensor, targets: Targets,
                weights: Sequence[float], exclude: torch.Tensor | None = None) -> Ranks:
    """Target ranks [W, R] under :func:`blend_scores` for every weight (ties counted as ties)."""
    return Ranks.stack([target_ranks(blend_scores(candidates, sasrec, w), targets, higher_is_better=True,
                                     exclude=exclude) for w in weights])


def choose_weight(candidates: Sequence[Candidates], sasrec: torch.Tensor, targets: Targets,
                  grid: Sequence[float] = WEIGHT_GRID, exclude: torch.Tensor | None = None) -> tuple[float, list[float]]:
    """The weight of ``grid`` with the best NDCG@10 on these (validation) rows, the smallest on a
    tie, and NDCG@10 at every weight of the grid."""
    ndcg = [row[0] for row in ndcg_hr_many(blend_ranks(candidates, sasrec, targets, grid, exclude), (10,))[0]]
    best = max(range(len(grid)), key=lambda i: (ndcg[i], -float(grid[i])))
    return float(grid[best]), ndcg


def top_items(candidates: Candidates, sasrec: torch.Tensor, weight: float, k: int,
              excluded: Sequence[int] = ()) -> list[tuple[int, float]]:
    """A row's ``k`` best (item id, blended score) under :func:`blend_scores`, ``excluded`` ids left
    out; ties go to the lower id. ``sasrec``: the row's scores [N]."""
    score = blend_scores([candidates], sasrec[None], weight)[0]
    if excluded:
        score[torch.tensor(sorted(set(excluded)))] = float("-inf")
    order = torch.argsort(-score, stable=True)[:k].tolist()
    return [(i, float(score[i])) for i in order if score[i] != float("-inf")]
