"""Amazon 2018 per-category review files, processed like the D3 procedure.

Reads ``<Category>_5.json[.gz]`` (reviewerID, asin, overall, unixReviewTime) and
``meta_<Category>.json[.gz]`` (asin, title), one JSON object per line. Titles are cleaned
(HTML entities; empty, HTML-bearing and over-20-word titles are dropped), an optional time
window keeps reviews in [start, end], an iterative K-core filter keeps users and items with at
least K reviews, and item ids are assigned after a seeded shuffle (seed 42, as D3 does).
"""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime

import pandas as pd

from bigrec.data.interactions import Interactions
from bigrec.data.prompts import normalize_title
from bigrec.data.sources import Source
from bigrec.io import InputError

HTML_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][^>]*>")
MAX_TITLE_WORDS = 20


def month_start(text: str, label: str) -> int:
    """``2017-10`` -> the unix time of 2017-10-01 00:00 UTC."""
    try:
        year, month = (int(p) for p in text.split("-")[:2])
        return int(datetime(year, month, 1, tzinfo=UTC).timestamp())
    except (ValueError, TypeError):
        raise InputError(f"--{label}: expected YYYY-MM, got {text!r}") from None


def clean_title(raw: object) -> str | None:
    """The cleaned title, or ``None`` when D3 would drop the item."""
    if not isinstance(raw, str) or HTML_TAG.search(raw) or "<span" in raw:
        return None
    title = normalize_title(raw)
    if len(title) <= 1 or HTML_TAG.search(title) or len(title.split()) > MAX_TITLE_WORDS:
        return None
    return title


def _json_lines(source: Source, name: str):
    label = source.label(name)
    for lineno, line in enumerate(source.read_text(name).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{label}: line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{label}: line {lineno}: expected a JSON object")
        yield lineno, obj


def find_category_files(source: Source, category: str | None) -> tuple[str, str, str]:
    """(category, reviews member, metadata member)."""
    if category is None:
        reviews = [n for n in source.names if re.search(r"(^|/)(?!meta_)[^/]+_5\.json(\.gz)?$", n)]
        if len(reviews) != 1:
            raise FileNotFoundError(
                f"{source.path}: expected one <Category>_5.json[.gz] file, found {len(reviews)}"
                + (f" ({', '.join(reviews)}); pass --category" if reviews else ""))
        category = re.sub(r"_5\.json(\.gz)?$", "", reviews[0].rsplit("/", 1)[-1])
    reviews_name = source.find(f"{category}_5.json", f"{category}_5.json.gz", f"{category}.json", f"{category}.json.gz")
    meta_name = source.find(f"meta_{category}.json", f"meta_{category}.json.gz")
    return category, reviews_name, meta_name


def read_amazon(source: Source, category: str | None = None, start: str | None = None,
                end: str | None = None, kcore: int = 5, seed: int = 42) -> Interactions:
    category, reviews_name, meta_name = find_category_files(source, category)
    titles: dict[str, str] = {}
    for lineno, meta in _json_lines(source, meta_name):
        if "asin" not in meta:
            raise InputError(f"{source.label(meta_name)}: line {lineno}: missing field 'asin'")
        title = clean_title(meta.get("title"))
        if title is not None:
            titles[str(meta["asin"])] = title
    lo = month_start(start, "start") if start else None
    hi = month_start(end, "end") if end else None
    rows = []
    for lineno, review in _json_lines(source, reviews_name):
        for key in ("reviewerID", "asin", "unixReviewTime"):
            if key not in review:
                raise InputError(f"{source.label(reviews_name)}: line {lineno}: missing field {key!r}")
        try:
            ts = int(review["unixReviewTime"])
        except (TypeError, ValueError):
            raise InputError(f"{source.label(reviews_name)}: line {lineno}: unixReviewTime "
                             f"{review['unixReviewTime']!r} is not an integer") from None
        if (lo is not None and ts < lo) or (hi is not None and ts > hi):
            continue
        asin = str(review["asin"])
        if asin not in titles:
            continue
        rows.append((str(review["reviewerID"]), asin, float(review.get("overall", "nan")), ts, lineno))
    table = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp", "order"])
    table = kcore_filter(table, kcore)
    items = list(dict.fromkeys(table["item"]))  # first appearance, as D3
    random.Random(seed).shuffle(items)
    notes = [f"category {category}", f"window {start or '-'}..{end or '-'}", f"{kcore}-core"]
    return Interactions(table.reset_index(drop=True), titles, source=str(source.path), items=items, notes=notes,
                        category=category)


def kcore_filter(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """Drop users and items with fewer than ``k`` interactions until none is left to drop."""
    if k <= 1:
        return table
    while True:
        users = table["user"].map(table["user"].value_counts())
        items = table["item"].map(table["item"].value_counts())
        keep = (users >= k) & (items >= k)
        if keep.all():
            return table
        table = table[keep]
