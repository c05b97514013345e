"""The two shapes a raw source can take before the common processing."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from bigrec.io import InputError

# Columns of an interaction table. ``order`` is the row's position in the raw file: the
# deterministic tie-break for interactions that share a timestamp (77% of ml-1m ratings do).
INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp", "order")


@dataclass
class Interactions:
    """All interactions of a source, with the title of every item key.

    ``items`` (optional) fixes the catalogue order: item keys in the order their ids are
    assigned. Items without interactions are dropped; items missing from it go last.
    """

    table: pd.DataFrame
    titles: dict[str, str]
    source: str
    items: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    category: str | None = None

    def __post_init__(self) -> None:
        missing = [c for c in INTERACTION_COLUMNS if c not in self.table.columns]
        if missing:
            raise InputError(f"{self.source}: interaction table lacks column(s) {', '.join(missing)}")


@dataclass
class SplitExamples:
    """Examples that a source ships already split (the D3 CSV layout).

    ``splits`` maps split name to a DataFrame with columns user, history (list of item keys),
    item, history_rating, rating, history_timestamp, timestamp; ``catalog`` lists
    (item key, title) in id order. Optional columns ``history_asin`` / ``asin`` carry the
    source's raw item keys when they differ from the catalogue keys.
    """

    splits: dict[str, pd.DataFrame]
    catalog: list[tuple[str, str]]
    source: str
    notes: list[str] = field(default_factory=list)
    category: str | None = None
