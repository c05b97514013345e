"""Prepared splits as item-id sequences for the conventional baselines.

The prepared CSVs carry at most ``max_history`` (10) previous items per row, but SASRec may
look further back. We rebuild each user's whole timeline from the rows themselves: reading
the user's rows in split order (train, valid, test; each CSV is sorted by time), the first
row's history starts the timeline and every row's target extends it. A row's context is then
everything before its own target on that timeline, which for ``max_len <= 10`` is exactly the
row's prepared history. Nothing after a row's target is ever part of its context: for a test
row the earlier valid and test interactions of the same user are history, as in the prepared
``history_item_id`` column itself.

Items of a row's history that were no earlier row's target (a prepared file that kept only
some targets, e.g. ``--min_target_rating``) are spliced in where the history overlaps the
timeline's end. If a row's history does not overlap it at all (rows out of order, or more
missing items than the history holds), the row starts a fresh timeline segment from its own
history, so its context is never wrong, only shorter; such rows are counted in
``Prepared.detached``.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bigrec.data.catalog import read_catalog
from bigrec.io import InputError

log = logging.getLogger(__name__)

PAD = -1  # padding value in the item-id space returned by ``contexts``
SPLITS = ("train", "valid", "test")


def _int_list(text: str) -> list[int]:
    """A list literal such as ``[3, 17]``; JSON parsing is much faster than ``ast`` on big files."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        value = ast.literal_eval(str(text))
    return [int(x) for x in value]


@dataclass
class Split:
    """One prepared split: per row, its user, prepared history, target and timeline position."""

    name: str
    user_ids: list  # [R] as read from the CSV (int or str)
    histories: list[list[int]]  # [R] the prepared ``history_item_id``
    targets: torch.Tensor  # [R] long, target item ids
    segment: np.ndarray = field(repr=False, default=None)  # [R] timeline segment of each row
    position: np.ndarray = field(repr=False, default=None)  # [R] index of the target in its segment

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, rows: list[int]) -> Split:
        """Only ``rows`` (sorted row numbers), before timelines are built."""
        return Split(name=self.name, user_ids=[self.user_ids[i] for i in rows],
                     histories=[self.histories[i] for i in rows], targets=self.targets[torch.tensor(rows, dtype=torch.long)])


@dataclass
class Prepared:
    """A prepared dataset folder read for the baselines."""

    titles: list[str]
    splits: dict[str, Split]
    flat: np.ndarray  # all timeline segments concatenated (item ids)
    starts: np.ndarray  # [S] offset of each segment in ``flat``
    catalog_digest: str = ""  # ties saved models to the catalogue they were trained on
    detached: int = 0  # rows whose history did not continue their user's timeline

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def contexts(self, split: str, max_len: int, rows: np.ndarray | None = None) -> torch.Tensor:
        """Left-padded contexts [R, max_len] (item ids, ``PAD`` on the left) of a split's rows."""
        part = self.splits[split]
        idx = np.arange(len(part)) if rows is None else np.asarray(rows)
        start = self.starts[part.segment[idx]]  # [R]
        end = start + part.position[idx]  # [R] exclusive: the target's offset
        return _windows(self.flat, start, end, max_len)


def _windows(flat: np.ndarray, start: np.ndarray, end: np.ndarray, length: int) -> torch.Tensor:
    """``flat[max(start, end-length):end]`` for every row, left-padded with ``PAD`` to ``length``."""
    offsets = end[:, None] - length + np.arange(length)[None, :]  # [R, L]
    valid = offsets >= start[:, None]
    out = np.where(valid, flat[np.clip(offsets, 0, max(len(flat) - 1, 0))], PAD)
    return torch.from_numpy(out.astype(np.int64))


def read_split(data_dir: str | Path, name: str) -> Split:
    """Read ``<name>.csv`` (user_id, history_item_id, item_id columns)."""
    path = Path(data_dir) / f"{name}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"prepared split not found: {path}")
    frame = pd.read_csv(path, usecols=["user_id", "history_item_id", "item_id"])
    histories = [_int_list(text) for text in frame["history_item_id"]]
    return Split(name=name, user_ids=frame["user_id"].tolist(), histories=histories,
                 targets=torch.tensor(frame["item_id"].to_numpy(dtype=np.int64)))


def _overlap(timeline: list[int], history: list[int]) -> int:
    """Longest k such that the timeline ends with ``history[:k]`` (normally all of it)."""
    for k in range(min(len(timeline), len(history)), 0, -1):
        if timeline[len(timeline) - k:] == history[:k]:
            return k
    return 0


def load_prepared(data_dir: str | Path, train_rows: list[int] | None = None) -> Prepared:
    """Read the catalogue and the three splits, and rebuild the users' timelines.

    ``train_rows``: keep only these rows of train.csv (the few-shot setting); the timelines are
    then built from those rows' own histories, so nothing of the unsampled rows leaks in.
    """
    catalog = read_catalog(Path(data_dir) / "id2name.txt")
    titles = catalog.titles
    splits = {name: read_split(data_dir, name) for name in SPLITS}
    if train_rows is not None:
        splits["train"] = splits["train"].subset(train_rows)
    for part in splits.values():
        bad = (part.targets < 0) | (part.targets >= len(titles))
        if len(part) and bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise InputError(f"{data_dir}/{part.name}.csv row {row}: item id outside the catalogue")
    segments: list[list[int]] = []
    current: dict[str, int] = {}  # user -> its current segment
    detached = 0
    for part in splits.values():
        part.segment = np.empty(len(part), dtype=np.int64)
        part.position = np.empty(len(part), dtype=np.int64)
        for i, (user, history, target) in enumerate(zip(part.user_ids, part.histories,
                                                        part.targets.tolist(), strict=True)):
            key = str(user)
            seg = current.get(key)
            if seg is not None:
                timeline = segments[seg]
                k = _overlap(timeline, history)
                if history and not k:
                    detached += 1
                    seg = None
                else:  # history items that were no row's target (e.g. filtered by rating) join too
                    timeline.extend(history[k:])
            if seg is None:
                seg = current[key] = len(segments)
                segments.append(list(history))
            part.segment[i] = seg
            part.position[i] = len(segments[seg])
            segments[seg].append(target)
    if detached:
        log.warning("%d rows did not continue their user's timeline; their context is their own history",
                    detached)
    lengths = np.array([len(s) for s in segments], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = np.fromiter((x for s in segments for x in s), dtype=np.int64, count=int(lengths.sum()))
    return Prepared(titles=titles, splits=splits, flat=flat, starts=starts,
                    catalog_digest=catalog.digest, detached=detached)


def training_windows(data: Prepared, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [W, max_len] that cover every train row's target exactly once.

    Per timeline segment, windows of ``max_len`` positions are cut from the last train target
    backwards; the input at a position is the previous item, so every position is trained on
    next-item prediction with its causal context inside the window (as in SASRec). Targets that
    are not train rows' targets (the first row's history) are ``PAD`` and carry no loss.
    """
    part = data.splits["train"]
    flat_pos = data.starts[part.segment] + part.position  # [R] offsets of train targets in ``flat``
    is_target = np.zeros(len(data.flat), dtype=bool)
    is_target[flat_pos] = True
    if not len(part):
        raise InputError("train.csv has no rows to train on")
    seg_of = np.searchsorted(data.starts, np.arange(len(data.flat)), side="right") - 1  # offset -> segment
    seg_list = seg_of.tolist()
    ends: list[int] = []
    low, seg = -1, -1
    for pos in np.sort(flat_pos)[::-1].tolist():  # segments are contiguous in ``flat``
        if pos < low or seg_list[pos] != seg:
            ends.append(pos + 1)
            low, seg = pos + 1 - max_len, seg_list[pos]
    end = np.asarray(ends, dtype=np.int64)
    seg_start = data.starts[seg_of[end - 1]]
    targets = _windows(data.flat, seg_start, end, max_len)  # [W, L]
    inputs = _windows(data.flat, seg_start, end - 1, max_len)  # [W, L] shifted by one
    offsets = end[:, None] - max_len + np.arange(max_len)[None, :]
    keep = torch.from_numpy(is_target[np.clip(offsets, 0, len(data.flat) - 1)] & (offsets >= seg_start[:, None]))
    keep &= inputs != PAD  # a target with nothing before it cannot be predicted
    targets = torch.where(keep, targets, torch.full_like(targets, PAD))
    return inputs, targets
