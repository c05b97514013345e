"""``bigrec recommend``: recommendations for one history with a finished run folder.

The history comes from ``--history`` (repeat it, oldest first; a catalogue title, or a
catalogue id written as digits when no title reads that way; list flags split on commas, so
the parts are regrouped into catalogue titles such as "Usual Suspects, The (1995)") or from
``--user ID``: that
user's latest row in the prepared data (test, else valid, else train), by default with the
row's target appended, so the recommendation is for what comes after everything known.
Prints the history matches, the generated text and the top-k items with their distances, or
with a run that ranks by likelihood the top-k items with their negative log-probabilities
(``--json`` prints the same as JSON).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bigrec.config import ConfigError, option
from bigrec.io import InputError

log = logging.getLogger(__name__)


@dataclass
class Config:
    run: str = option(help="finished run folder (holds run.yaml; written by bigrec demo)")
    history: list[str] = option(help="a history item, oldest first; repeat the flag (title or catalogue id)",
                                factory=list, split=False)
    user: str | None = option(None, "take this user's latest history from the run's prepared data instead")
    include_target: bool = option(True, "with --user: end the history with the latest row's target (false: "
                                        "use the row's history and show its target as the held-out answer)")
    k: int = option(10, "how many items to recommend", aliases=("-k",), minimum=1)
    use_ci: bool | None = option(None, "re-weight the distances by the run's SASRec scores (needs ci_gamma in "
                                       "run.yaml); default: the ranking the run chose on validation (run.yaml use_ci)")
    exclude_history: bool | None = option(None, "leave the history's items out of the recommendations "
                                                "(default: the run's, run.yaml exclude_history)")
    json: bool = option(False, "print the result as JSON")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available)")

    def validate(self) -> None:
        if bool(self.history) == (self.user is not None):
            raise ConfigError("give either --history (one or more) or --user")


@dataclass
class UserHistory:
    items: list[int]
    split: str
    row: int
    held_out: int | None = None  # the row's target when it is not part of the history
    note: list[str] = field(default_factory=list)


def user_history(data_dir: Path, user: str, max_history: int, include_target: bool = True) -> UserHistory:
    """The user's latest prepared row: history (+ target), cut to the last ``max_history`` items."""
    from bigrec.baselines.data import read_split

    for split in ("test", "valid", "train"):
        if not (data_dir / f"{split}.csv").is_file():
            continue
        part = read_split(data_dir, split)
        rows = [r for r, u in enumerate(part.user_ids) if str(u) == str(user)]
        if rows:
            r = rows[-1]  # rows are sorted by target time
            target = int(part.targets[r])
            items = list(part.histories[r]) + ([target] if include_target else [])
            return UserHistory(items[-max_history:], split, r, None if include_target else target)
    raise InputError(f"user {user!r} has no row in {data_dir}/{{test,valid,train}}.csv")


def parse_history(values: list[str], catalog) -> list[str | int]:
    """Digits are a catalogue id unless some title reads that way."""
    return [int(v) if v.strip().isdigit() and not catalog.is_title(v) else v for v in values]


def format_result(result, catalog, held_out: int | None = None) -> str:
    lines = ["history:"]
    for n, m in enumerate(result.history, start=1):
        given = f"#{m.given}" if isinstance(m.given, int) else repr(m.given)
        if m.how == "nearest":
            lines.append(f"  {n:>2}. {given} is not in the catalogue; nearest title: #{m.id} {m.title} "
                         f"(distance {m.distance:.4f})")
        elif m.how == "case":
            lines.append(f"  {n:>2}. {given} -> #{m.id} {m.title} (matched ignoring case)")
        else:
            lines.append(f"  {n:>2}. #{m.id} {m.title}")
    ranked = result.decoding == "likelihood"  # nothing generated: every title scored
    if not ranked:
        lines.append(f"generated: {result.generated[0] if result.generated else ''}")
        for n, text in enumerate(result.generated[1:], start=2):
            lines.append(f"  beam {n}: {text}")
    label = ("-log p(title | history)" if ranked else
             "score: the beams' items first (minus the beam score), then L2 distance"
             + (" re-weighted by SASRec" if result.use_ci else "") if result.decoding == "constrained" else
             "score (re-weighted by SASRec)" if result.use_ci else "distance")
    lines.append(f"ranking: {result.ranking}")
    lines.append(f"top {len(result.items)} ({label}):")
    width = len(str(len(catalog) - 1))
    for n, item in enumerate(result.items, start=1):
        extra = f"  (distance {item.distance:.4f})" if result.use_ci and item.distance is not None else ""
        mark = "  <- held-out target" if held_out is not None and catalog.titles[held_out] == item.title else ""
        lines.append(f"  {n:>2}. #{item.id:<{width}}  {item.score:8.4f}  {item.title}{extra}{mark}")
    if held_out is not None:
        lines.append(f"held-out target: #{held_out} {catalog.titles[held_out]}")
    return "\n".join(lines)


def run(config: Config) -> int:
    from bigrec.app.recommender import Recommender

    rec = Recommender.from_run(config.run, device=config.device)
    held_out = None
    if config.user is not None:
        data_dir = rec.manifest.path(rec.run_dir, "data")
        if data_dir is None:
            raise InputError(f"{rec.run_dir}/run.yaml has no prepared data folder; --user needs one")
        found = user_history(data_dir, config.user, rec.max_history, config.include_target)
        history: list[str | int] = list(found.items)
        held_out = found.held_out
        log.info("user %s: latest row %d of %s.csv, %d items", config.user, found.row, found.split, len(history))
    else:
        history = parse_history(config.history, rec.catalog)
    (result,) = rec.recommend([history], k=config.k, use_ci=config.use_ci, exclude_history=config.exclude_history)
    if config.json:
        out = result.to_dict()
        if held_out is not None:
            out["held_out"] = {"id": held_out, "title": rec.catalog.titles[held_out]}
        sys.stdout.write(json.dumps(out, ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write(format_result(result, rec.catalog, held_out) + "\n")
    return 0
