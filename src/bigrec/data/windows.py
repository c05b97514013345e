"""Interactions -> examples: sequence windows and the split by time.

Each user's interactions are sorted by time (stable; ties keep raw-file order), one example
is emitted per target with up to ``max_history`` previous items and at least
``min_history``, examples are sorted by target time and cut into train/valid/test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bigrec.data.interactions import Interactions, SplitExamples
from bigrec.io import InputError

SPLITS = ("train", "valid", "test")


def build_catalog(inter: Interactions) -> tuple[pd.DataFrame, list[tuple[str, str]], list[str]]:
    """Keep interactions whose item has a title; catalogue = items with interactions, in id order."""
    table = inter.table
    notes = []
    titled = table["item"].isin(inter.titles.keys())
    if not titled.all():
        missing = table.loc[~titled, "item"].nunique()
        notes.append(f"dropped {int((~titled).sum())} interactions with {missing} item(s) that have no title")
        table = table[titled]
    if table.empty:
        raise InputError(f"{inter.source}: no interactions left (no item with a title, or every row filtered)")
    present = set(table["item"].unique())
    order = [k for k in (inter.items or []) if k in present]
    seen = set(order)
    order += [k for k in dict.fromkeys(table["item"]) if k not in seen]
    catalog = [(key, inter.titles[key]) for key in order]
    return table, catalog, notes


def window_and_split(inter: Interactions, max_history: int = 10, min_history: int = 1,
                     ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
                     min_target_rating: float | None = None) -> SplitExamples:
    if max_history < 1 or min_history < 1 or min_history > max_history:
        raise InputError(f"need 1 <= min_history <= max_history, got min_history={min_history}, max_history={max_history}")
    table, catalog, notes = build_catalog(inter)
    table = table.sort_values(["user", "timestamp", "order"], kind="stable").reset_index(drop=True)
    if table["timestamp"].dtype.kind == "f" and (table["timestamp"] % 1 == 0).all():
        table["timestamp"] = table["timestamp"].astype("int64")
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    ratings = table["rating"].to_numpy(dtype=float)
    times = table["timestamp"].to_numpy()
    order = table["order"].to_numpy()
    pos = table.groupby("user", sort=False).cumcount().to_numpy()
    targets = np.flatnonzero(pos >= min_history)
    if min_target_rating is not None:
        targets = targets[ratings[targets] >= min_target_rating]
    if len(targets) == 0:
        raise InputError(f"{inter.source}: no example: no user has {min_history} or more earlier interactions "
                         "before a target (lower --min_history?)")
    targets = targets[np.lexsort((order[targets], times[targets]))]  # by target time, then raw order
    items_l, ratings_l, times_l = items.tolist(), [None if r != r else r for r in ratings.tolist()], times.tolist()
    starts = (targets - np.minimum(pos[targets], max_history)).tolist()
    frame = pd.DataFrame({
        "user": users[targets],
        "history": [items_l[s:t] for s, t in zip(starts, targets.tolist(), strict=True)],
        "item": items[targets],
        "history_rating": [ratings_l[s:t] for s, t in zip(starts, targets.tolist(), strict=True)],
        "rating": [ratings_l[t] for t in targets.tolist()],
        "history_timestamp": [times_l[s:t] for s, t in zip(starts, targets.tolist(), strict=True)],
        "timestamp": times[targets],
    })
    return SplitExamples(split_by_time(frame, ratios), catalog, source=inter.source, notes=inter.notes + notes,
                         category=inter.category)


def split_by_time(frame: pd.DataFrame, ratios: tuple[float, float, float]) -> dict[str, pd.DataFrame]:
    """Cut time-sorted examples into consecutive train/valid/test blocks (the reference's int() cuts)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise InputError(f"--split_ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    n = len(frame)
    a = int(n * ratios[0])
    b = int(n * (ratios[0] + ratios[1]))
    cuts = {"train": (0, a), "valid": (a, b), "test": (b, n)}
    return {name: frame.iloc[lo:hi].reset_index(drop=True) for name, (lo, hi) in cuts.items()}
