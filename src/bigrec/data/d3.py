"""Existing D3-layout splits: ``train/``, ``valid/``, ``test/`` CSVs and an ``info/`` catalogue.

Two variants are read: D3's own (``item_asins``, timestamps, ``title<TAB>id`` info lines) and
MiniOneRec's (``sid<TAB>title<TAB>id`` info lines, no timestamps, no train split). The split
membership of every row is kept. Without a train split, the given valid rows are carved by
order into train (first 90%) and valid (last 10%), and this is recorded in the stats.
"""

from __future__ import annotations

import ast
import io
import re

import pandas as pd

from bigrec.data.interactions import SplitExamples
from bigrec.data.prompts import normalize_title
from bigrec.data.sources import Source
from bigrec.io import InputError

SPLITS = ("train", "valid", "test")


def read_catalog_lines(text: str, label: str) -> list[tuple[str, str]]:
    """(item id, title) from ``title<TAB>id`` or ``sid<TAB>title<TAB>id`` lines."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) == 2:
            title, item = parts
        elif len(parts) == 3:
            _, title, item = parts
        else:
            raise InputError(f"{label}: line {lineno}: expected 'title<TAB>id' or 'sid<TAB>title<TAB>id', "
                             f"got {len(parts)} field(s)")
        if not item.strip().lstrip("-").isdigit():
            raise InputError(f"{label}: line {lineno}: item id {item!r} is not an integer")
        out.append((item.strip(), normalize_title(title)))
    if not out:
        raise InputError(f"{label}: no catalogue lines")
    return out


def _pick(source: Source, folder: str, category: str | None, required: bool) -> str | None:
    names = [n for n in source.names if f"/{folder}/" in f"/{n}" and n.endswith((".csv", ".txt"))
             and n.split("/")[-2] == folder]
    if category:
        names = [n for n in names if n.rsplit("/", 1)[-1].startswith(category)]
    if len(names) > 1:
        raise InputError(f"{source.path}/{folder}: several files ({', '.join(names)}); pass --category to choose")
    if not names:
        if required:
            raise FileNotFoundError(f"{source.path}: no {folder}/ file found")
        return None
    return names[0]


def _literal_list(value: object, label: str, row: int, column: str) -> list:
    if isinstance(value, list):
        return value
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        raise InputError(f"{label}: row {row + 2}: column {column!r} is not a Python list literal") from None
    if not isinstance(parsed, list):
        raise InputError(f"{label}: row {row + 2}: column {column!r} is not a list")
    return parsed


def read_d3(source: Source, category: str | None = None) -> SplitExamples:
    info = _pick(source, "info", category, True)
    catalog = read_catalog_lines(source.read_text(info), source.label(info))
    if category is None:  # "Industrial_and_Scientific_5_2016-10-2018-11.txt" -> Industrial_and_Scientific
        match = re.match(r"(.+?)_\d+(?:_|\.|$)", info.rsplit("/", 1)[-1])
        category = match.group(1) if match else None
    known = {item for item, _ in catalog}
    by_title = {}
    for item, title in catalog:
        by_title.setdefault(title, item)
    splits: dict[str, pd.DataFrame] = {}
    clock = 0
    notes = []
    for split in SPLITS:
        name = _pick(source, split, category, required=split != "train")
        if name is None:
            continue
        label = source.label(name)
        frame = pd.read_csv(io.StringIO(source.read_text(name)), dtype=str, keep_default_na=False)
        if "user_id" not in frame.columns:
            raise InputError(f"{label}: missing column 'user_id'")
        has_ids = "history_item_id" in frame.columns and "item_id" in frame.columns
        if not has_ids and not ("history_item_title" in frame.columns and "item_title" in frame.columns):
            raise InputError(f"{label}: missing columns 'history_item_id' and 'item_id' (or the title columns)")
        has_time = "timestamp" in frame.columns and "history_timestamp" in frame.columns
        rows = []
        for i, rec in enumerate(frame.to_dict("records")):
            if has_ids:
                history = [str(x) for x in _literal_list(rec["history_item_id"], label, i, "history_item_id")]
                item = str(rec["item_id"]).strip()
            else:
                titles = _literal_list(rec["history_item_title"], label, i, "history_item_title")
                history = [by_title.get(normalize_title(t), "?" + str(t)) for t in titles]
                item = by_title.get(normalize_title(rec["item_title"]), "?" + str(rec["item_title"]))
            for key in [*history, item]:
                if key not in known:
                    raise InputError(f"{label}: row {i + 2}: item {key.lstrip('?')!r} is not in the info catalogue")
            if has_time:
                h_time = [int(float(x)) for x in _literal_list(rec["history_timestamp"], label, i, "history_timestamp")]
                time = int(float(rec["timestamp"]))
            else:
                h_time, time = [None] * len(history), clock
            clock += 1
            ratings = (_literal_list(rec["history_rating"], label, i, "history_rating")
                       if "history_rating" in frame.columns else [None] * len(history))
            rating = float(rec["rating"]) if rec.get("rating", "") not in ("", None) else None
            asins = (_literal_list(rec["item_asins"], label, i, "item_asins")
                     if "item_asins" in frame.columns and "item_asin" in frame.columns else history)
            rows.append({"user": str(rec["user_id"]), "history": history, "item": item,
                         "history_asin": [str(a) for a in asins], "asin": str(rec.get("item_asin", item)),
                         "history_rating": ratings, "rating": rating,
                         "history_timestamp": h_time, "timestamp": time})
        splits[split] = pd.DataFrame(rows, columns=["user", "history", "item", "history_rating", "rating",
                                                    "history_timestamp", "timestamp", "history_asin", "asin"])
        if not has_time:
            notes.append(f"{split}: no timestamps; row order is used as the time")
    if "train" not in splits:
        valid = splits["valid"]
        cut = int(len(valid) * 0.9)
        splits["train"], splits["valid"] = valid.iloc[:cut].reset_index(drop=True), valid.iloc[cut:].reset_index(drop=True)
        notes.append("no train split: train is the first 90% of the source's valid rows, valid the last 10%")
    return SplitExamples({s: splits[s] for s in SPLITS}, catalog, source=str(source.path), notes=notes,
                         category=category)
