"""What each evaluated ranking is, as fields, and its display label, made from them in one place.

``bigrec evaluate`` writes every ranking of a result file under a label (the metrics JSON's keys,
the details' ``ranks``) and, beside them, ``details["files"][name]["runs"]``: label -> the fields
of :class:`RunKey`. Code that looks a ranking up (the demo, the benchmarks) asks by fields with
:func:`find_run`; no code parses a label, so rewording one drops nothing from a comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# plain: the decoding's own ranking (grounded, or its ranked items first); last_title: the content
# baseline; reweighted: d * (1 + s) ** -gamma; blend: a weighted sum of min-max ranks; likelihood_cf:
# log p + w * SASRec's min-max score over both models' candidates
RANKINGS = ("plain", "last_title", "reweighted", "blend", "likelihood_cf")
CHOICES = ("each metric", "NDCG")  # how a gamma or weight was chosen on validation: per metric@K, or by NDCG@k


@dataclass(frozen=True)
class RunKey:
    """One ranking of one result file: which ranking, re-weighted by what, its parameter chosen how."""

    file: str  # the result file's name ("test.json")
    ranking: str = "plain"
    weights: str | None = None  # the second model's scores: "CI" or "popularity" (reweighted, blend), "SASRec"
    chosen_by: str | None = None  # a CHOICES entry, where validation chose a gamma or weight
    k: int | None = None  # the cutoff of chosen_by "NDCG"

    def __post_init__(self):
        if self.ranking not in RANKINGS:
            raise ValueError(f"unknown ranking {self.ranking!r}; expected one of {', '.join(RANKINGS)}")
        if self.chosen_by is not None and self.chosen_by not in CHOICES:
            raise ValueError(f"unknown choice {self.chosen_by!r}; expected one of {', '.join(CHOICES)}")
        if (self.chosen_by == "NDCG") != (self.k is not None):
            raise ValueError("k is the cutoff of a choice by NDCG@k, and only that")

    @property
    def label(self) -> str:
        """The run's name in tables and files (the only place one is made)."""
        by = "per metric@K" if self.chosen_by == "each metric" else f"by NDCG@{self.k}"
        if self.ranking == "plain":
            return self.file
        if self.ranking == "last_title":
            return f"{self.file} last history title"
        if self.ranking == "reweighted":
            return f"{self.file} +{self.weights} (gamma {by})"
        if self.ranking == "blend":
            return f"{self.file} +{self.weights} blend (weight {by})"
        return f"{self.file} +{self.weights} (weight {by})"  # likelihood_cf

    def fields(self) -> dict:
        return asdict(self)


def find_run(info: dict, **fields) -> str | None:
    """The label of the ranking in a details ``files`` entry whose fields include ``fields``
    (``ranking="reweighted", weights="CI", chosen_by="NDCG", k=10``), or None when it has none.
    More than one match is an error: the question was not precise enough."""
    found = [label for label, key in info.get("runs", {}).items()
             if all(key.get(name) == value for name, value in fields.items())]
    if len(found) > 1:
        raise ValueError(f"{fields} matches {len(found)} rankings: {', '.join(found)}")
    return found[0] if found else None
