"""The timeline layout: a user's training period as one text, one title per line, oldest first.

The window layout (the paper's) teaches one target per prompt of up to 10 titles. The timeline
layout writes each user's training interactions once, in time order, and puts the loss on every
title after the first row's history, so one sequence supervises every position, as SASRec's
training does. Its text::

    The movies the user has watched, in order:\\n
    Toy Story (1995)\\n
    Heat (1995)\\n
    ...

A header line, then each title followed by the separator ``SEP`` (a newline; titles are
normalised and hold none). A row in this layout (``timeline_row``; prepare writes every split so
with ``--layout timeline``) keeps the instruction-row fields: ``instruction`` is the header,
``input`` the history's lines, ``output`` the target title, unquoted. Its prompt,
``instruction + SEP + input``, is the start of a timeline text, and the model continues it with
the target's line: generation stops at the separator, as training ends every title with it.

A user's training text (:func:`user_timelines`) is built from the training rows alone, in file
order (prepare writes rows by target time): the history of the user's first row, then the target
of each of the user's rows. Nothing after the last training target enters it, and no EOS ends it:
the user's story goes on in the validation and test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigrec.data.prompts import Domain
from bigrec.io import InputError

SEP = "\n"  # ends every title of a timeline text; generation stops at it


def header(domain: Domain) -> str:
    """The first line of a timeline text: ``The movies the user has watched, in order:``."""
    return f"The {domain.plural} the user has {domain.verb}, in order:"


def lines(titles: list[str]) -> str:
    """Titles as timeline lines, each followed by the separator."""
    for title in titles:
        if SEP in title or not title.strip():
            raise InputError(f"title {title!r} cannot be a timeline line (empty, or holds the separator)")
    return "".join(title + SEP for title in titles)


def timeline_row(domain: Domain, history_titles: list[str], target_title: str) -> dict[str, str]:
    """A row in the timeline layout: the header, the history's lines, the unquoted target (empty: a
    query row, only its prompt is used, as ``recommend`` asks for the next title)."""
    if target_title:
        lines([target_title])
    return {"instruction": header(domain), "input": lines(history_titles), "output": target_title}


def check_row(row: dict, where: str = "row") -> None:
    """A timeline row holds its history as lines: an ``input`` that ends with the separator."""
    text = row.get("input")
    if not isinstance(text, str) or not text.endswith(SEP) or not text.strip():
        raise InputError(f"{where}: not a timeline-layout row (its 'input' must hold the history's titles, one "
                         "per line); prepare the data with --layout timeline")


def prompt(row: dict) -> str:
    """The generation prompt of a timeline row: the start of a timeline text, ending with a separator."""
    check_row(row)
    return row["instruction"] + SEP + row["input"]


def history_titles(row: dict) -> list[str]:
    """The titles of a timeline row's history, in order."""
    check_row(row)
    return row["input"][:-len(SEP)].split(SEP)


@dataclass
class Timeline:
    """One text: ``titles[:first_target]`` is context only (no loss), the rest are targets."""

    header: str
    titles: list[str]
    first_target: int
    user: str | None = None
    item_ids: list[int] | None = None  # catalogue ids of the titles, where the rows carry them

    def text(self) -> str:
        return self.header + SEP + lines(self.titles)

    @property
    def targets(self) -> list[str]:
        return self.titles[self.first_target:]


def row_timeline(row: dict) -> Timeline:
    """One row as a text whose only target is the row's own (validation rows)."""
    history = history_titles(row)
    return Timeline(row["instruction"], history + [str(row["output"])], len(history),
                    None if row.get("user_id") is None else str(row["user_id"]))


def user_timelines(rows: list[dict], where: str = "rows") -> tuple[list[Timeline], int]:
    """Per user (in order of first appearance), the training text of the user's rows taken in file
    order; and the number of rows whose history is not the end of their user's text so far (rows
    out of time order, or targets left out by a rating filter: the text still holds only targets)."""
    by_user: dict[str, Timeline] = {}
    disagree = 0
    for i, row in enumerate(rows):
        check_row(row, f"{where}, row {i}")
        if row.get("user_id") is None:
            raise InputError(f"{where}, row {i}: no 'user_id'; the timeline layout groups rows by user")
        user = str(row["user_id"])
        history, target = history_titles(row), str(row["output"])
        ids = [*row["history_item_id"], row["item_id"]] if "history_item_id" in row and "item_id" in row else None
        found = by_user.get(user)
        if found is None:
            by_user[user] = Timeline(row["instruction"], history + [target], len(history), user, ids)
            continue
        if found.titles[max(len(found.titles) - len(history), 0):] != history:
            disagree += 1
        found.titles.append(target)
        found.item_ids = None if found.item_ids is None or ids is None else [*found.item_ids, ids[-1]]
    return list(by_user.values()), disagree
