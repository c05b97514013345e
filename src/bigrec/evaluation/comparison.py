"""Rankings side by side on the same rows: metrics, 95% intervals and paired differences.

Every result that ranks the catalogue for the same test rows (BIGRec's grounding, a baseline's
scores, the content baseline) reduces to one rank per row (with its ties, :class:`Ranks`). Holding those ranks in one place
lets every method get its interval from the same bootstrap draws, and any two of them a paired
difference: the honest way to say that one beats another on these rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bigrec.evaluation.intervals import bootstrap_ci, paired_difference
from bigrec.evaluation.metrics import TOPK, Ranks, as_ranks, ndcg_hr
from bigrec.evaluation.report import with_interval


@dataclass
class Comparison:
    """Per-row ranks [R] of named results on the same R rows, plus metric-only entries (expected values)."""

    rows: int
    ranks: dict[str, Ranks] = field(default_factory=dict)
    expected: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, name: str, ranks: Ranks | torch.Tensor | Sequence[int]) -> None:
        """``ranks``: :class:`Ranks` (integer ranks are taken as untied; read a details file's
        with :func:`bigrec.evaluation.metrics.details_ranks`)."""
        ranks = as_ranks(ranks)
        if ranks.shape != (self.rows,):
            raise ValueError(f"{name}: {tuple(ranks.shape)} ranks, expected one per row ({self.rows})")
        self.ranks[name] = ranks

    def metrics(self) -> dict[str, dict[str, list[float]]]:
        """``{name: {"NDCG": [...], "HR": [...]}}`` in the order results were added, expected ones last."""
        return {**{name: ndcg_hr(r, TOPK) for name, r in self.ranks.items()}, **self.expected}

    def intervals(self) -> dict[str, dict]:
        """``{name: {"ci": ...}}`` for every ranked result (:func:`bigrec.evaluation.intervals.bootstrap_ci`)."""
        return {name: {"ci": bootstrap_ci(r, TOPK)} for name, r in self.ranks.items()}

    def paired(self, pairs: Sequence[tuple[str, str]]) -> dict[str, dict]:
        """``{"A minus B": paired difference}`` for each pair whose two results are both present."""
        return {f"{a} minus {b}": paired_difference(self.ranks[a], self.ranks[b], TOPK)
                for a, b in pairs if a in self.ranks and b in self.ranks}


def describe_pairs(paired: dict[str, dict], k: int = 10) -> list[str]:
    """One line per paired difference at K: the difference of NDCG and HR with their intervals, and
    whether the interval of the NDCG difference lies above zero, below it, or straddles it."""
    j = list(TOPK).index(k)
    lines = []
    for name, diff in paired.items():
        nd, hr = diff["NDCG"], diff["HR"]
        lo, hi = nd["ci"][j]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "no difference at this confidence"
        lines.append(f"{name}: NDCG@{k} {with_interval(nd['diff'][j], nd['ci'][j], signed=True)}, "
                     f"HR@{k} {with_interval(hr['diff'][j], hr['ci'][j], signed=True)} ({verdict})")
    return lines
