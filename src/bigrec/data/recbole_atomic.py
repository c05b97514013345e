"""RecBole atomic files: ``.inter`` (user, item, timestamp[, rating]) and ``.item`` (titles).

Two forms are read: one interaction per line, and the sequence form (``item_id_list`` per
user plus the last ``item_id``, no timestamps) in which the position within a user's
sequence is the time.
"""

from __future__ import annotations

import csv
import io

import pandas as pd

from bigrec.data.interactions import Interactions
from bigrec.data.prompts import normalize_title
from bigrec.data.sources import Source
from bigrec.io import InputError

TITLE_FIELDS = ("title", "movie_title", "item_title", "name", "item_name")


def parse_atomic(text: str, label: str) -> tuple[list[str], list[list[str]]]:
    """Header field names (without ``:type``) and the rows of one atomic file."""
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{label}: empty file, expected a header of name:type fields") from None
    names = [h.split(":", 1)[0].strip() for h in header]
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(names):
            row = row + [""] * (len(names) - len(row))
        if len(row) > len(names):
            raise InputError(f"{label}: line {lineno}: {len(row)} fields, header has {len(names)}")
        rows.append(row)
    return names, rows


def _field(names: list[str], candidates: tuple[str, ...], label: str, required: bool = True) -> int | None:
    for cand in candidates:
        if cand in names:
            return names.index(cand)
    if required:
        raise InputError(f"{label}: missing column {candidates[0]!r} (found {', '.join(names)})")
    return None


def read_item_titles(text: str, label: str) -> tuple[list[str], dict[str, str]]:
    """Item keys in file order and their titles; ``release_year`` is appended MovieLens-style."""
    names, rows = parse_atomic(text, label)
    i_item = _field(names, ("item_id",), label)
    i_title = _field(names, TITLE_FIELDS, label)
    i_year = _field(names, ("release_year", "year"), label, required=False)
    order, titles = [], {}
    for row in rows:
        title = normalize_title(row[i_title])
        if i_year is not None and row[i_year].strip():
            year = row[i_year].strip()
            year = year[:-2] if year.endswith(".0") else year
            if not title.endswith(f"({year})"):
                title = f"{title} ({year})"
        key = row[i_item].strip()
        if key not in titles:
            order.append(key)
        titles[key] = title
    return order, titles


def read_recbole(source: Source, name: str | None = None, user_prefix: str = "") -> Interactions:
    """Read ``<name>.inter`` (all ``.inter`` files in the sequence form) and ``<name>.item``."""
    item_files = source.glob(".item") if name is None else [source.find(f"{name}.item")]
    if not item_files:
        raise FileNotFoundError(f"{source.path}: no .item file with titles found")
    item_name = item_files[0]
    stem = item_name.rsplit("/", 1)[-1][: -len(".item")]
    order, titles = read_item_titles(source.read_text(item_name), source.label(item_name))
    inter_files = [n for n in source.glob(".inter") if n.rsplit("/", 1)[-1].startswith(stem)]
    if not inter_files:
        raise FileNotFoundError(f"{source.path}: no {stem}*.inter file found")
    first_names, _ = parse_atomic(source.read_text(inter_files[0]).split("\n", 1)[0] + "\n", inter_files[0])
    if "item_id_list" in first_names:
        table = _sequence_form(source, inter_files)
        notes = ["sequence form: the position within a user's sequence is used as the time"]
    else:
        table = _interaction_form(source, inter_files[0])
        notes = []
    if user_prefix:
        table["user"] = table["user"].str.removeprefix(user_prefix)
    return Interactions(table, titles, source=str(source.path), items=order, notes=notes)


def _interaction_form(source: Source, inter: str) -> pd.DataFrame:
    label = source.label(inter)
    names, rows = parse_atomic(source.read_text(inter), label)
    iu = _field(names, ("user_id",), label)
    ii = _field(names, ("item_id",), label)
    it = _field(names, ("timestamp",), label)
    ir = _field(names, ("rating",), label, required=False)
    try:
        ts = [float(r[it]) for r in rows]
        ratings = [float(r[ir]) if ir is not None and r[ir].strip() else float("nan") for r in rows]
    except ValueError as exc:
        bad = next(n for n, r in enumerate(rows, start=2) if not _is_number(r[it]) or (ir is not None and r[ir].strip() and not _is_number(r[ir])))
        raise InputError(f"{label}: line {bad}: timestamp/rating is not a number ({exc})") from None
    return pd.DataFrame({
        "user": [r[iu].strip() for r in rows], "item": [r[ii].strip() for r in rows],
        "rating": ratings, "timestamp": ts, "order": range(len(rows)),
    })


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _sequence_form(source: Source, inter_files: list[str]) -> pd.DataFrame:
    """Each user's longest sequence across the files; the position is the timestamp."""
    longest: dict[str, list[str]] = {}
    for inter in inter_files:
        label = source.label(inter)
        names, rows = parse_atomic(source.read_text(inter), label)
        iu = _field(names, ("user_id",), label)
        il = _field(names, ("item_id_list",), label)
        ii = _field(names, ("item_id",), label, required=False)
        for row in rows:
            seq = row[il].split() + ([row[ii].strip()] if ii is not None and row[ii].strip() else [])
            user = row[iu].strip()
            if len(seq) > len(longest.get(user, ())):
                longest[user] = seq
    users, items, positions = [], [], []
    for user, seq in longest.items():
        users.extend([user] * len(seq))
        items.extend(seq)
        positions.extend(range(len(seq)))
    return pd.DataFrame({"user": users, "item": items, "rating": float("nan"),
                         "timestamp": positions, "order": range(len(users))})
