"""``bigrec prepare``: a public dataset -> catalogue, time splits and instruction files.

All sources go through one path: read (``bigrec.data.*``) -> window and split by time ->
write ``id2name.txt``, the D3 split CSVs, the instruction JSON files, the 5,000-row samples,
``stats.json`` and ``config.yaml`` (see docs/formats.md). Files are staged and moved into the
output folder only when everything succeeded, so a failed run leaves it as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from bigrec.config import check_output_dir, option, to_dict
from bigrec.data.amazon import read_amazon
from bigrec.data.d3 import read_d3
from bigrec.data.interactions import SplitExamples
from bigrec.data.movielens import read_movielens
from bigrec.data.prompts import DOMAINS, Domain, domain_for_category, natural_title
from bigrec.data.recbole_atomic import read_recbole
from bigrec.data.sources import Source
from bigrec.data.windows import SPLITS, window_and_split
from bigrec.io import InputError, staged_dir, write_json, write_json_rows, write_text, write_yaml
from bigrec.llm.layouts import LAYOUT_HELP, LAYOUTS, Layout, get_layout

log = logging.getLogger(__name__)

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "amazon", "d3", "recbole-atomic")
CSV_COLUMNS = ["user_id", "item_asins", "item_asin", "history_item_id", "item_id", "history_item_title",
               "item_title", "history_rating", "rating", "history_timestamp", "timestamp"]


@dataclass
class Config:
    dataset: str = option(help="which dataset or source layout", choices=DATASETS)
    out: str = option(help="output folder")
    source: str | None = option(None, "local file, folder or archive to read instead of downloading")
    category: str | None = option(None, "Amazon category (e.g. Video_Games); picks files in amazon/d3 sources")
    domain: str | None = option(None, f"prompt wording: one of {', '.join(DOMAINS)} (default: from the dataset)")
    max_history: int = option(10, "most previous items per example")
    min_history: int = option(1, "fewest previous items per example (10 reproduces the reference movie notebook)")
    split_ratios: list[float] = option(help="train/valid/test shares, cut by time", factory=lambda: [0.8, 0.1, 0.1])
    min_target_rating: float | None = option(None, "only emit targets rated at least this (the reference movie notebook used 4)")
    start: str | None = option(None, "amazon: first month kept, YYYY-MM")
    end: str | None = option(None, "amazon: last month kept, YYYY-MM")
    kcore: int = option(5, "amazon: iterative K-core on users and items (0 disables)")
    seed: int = option(42, "seed of the item-id shuffle (amazon) and of the 5,000-row samples")
    sample_rows: int = option(5000, "rows in valid_5000.json / test_5000.json", minimum=1)
    users: int | None = option(None, "keep a random subset of this many users (drawn with --seed) in every split, so "
                                     "that every model trained and scored on the folder sees exactly them; the "
                                     "catalogue stays whole", minimum=1, keyed_at_default=False)
    prompt_titles: str = option("catalogue", "titles in the instruction rows (prompts and answers) as the catalogue "
                                             "writes them ('Shining, The (1980)', the reference) or natural ('The "
                                             "Shining (1980)', the order a language model knows)",
                                choices=["catalogue", "natural"], keyed_at_default=False)
    layout: str = option("window", "the instruction rows' layout; " + LAYOUT_HELP + " (the rows hold the "
                                   "header, the history's titles one per line, and the unquoted target)",
                         choices=list(LAYOUTS), keyed_at_default=False)

    def validate(self) -> None:
        check_output_dir(self.out, "out")
        if self.domain is not None and self.domain not in DOMAINS:
            raise InputError(f"--domain: unknown {self.domain!r}; choose one of {', '.join(DOMAINS)}")


def read_source(cfg: Config) -> SplitExamples:
    source = Source(cfg.source) if cfg.source else None
    if cfg.dataset in ("ml-100k", "ml-1m", "ml-10m"):
        inter = read_movielens(cfg.dataset, source)
    elif source is None:
        raise InputError(f"--dataset {cfg.dataset} needs --source PATH (a local file, folder or archive)")
    elif cfg.dataset == "amazon":
        inter = read_amazon(source, cfg.category, cfg.start, cfg.end, cfg.kcore, cfg.seed)
    elif cfg.dataset == "recbole-atomic":
        inter = read_recbole(source)
    else:
        return read_d3(source, cfg.category)
    return window_and_split(inter, cfg.max_history, cfg.min_history, tuple(cfg.split_ratios), cfg.min_target_rating)


def sample_users(examples: SplitExamples, users: int, seed: int) -> SplitExamples:
    """Every split's examples of ``users`` users drawn at random (``seed``) from those the splits hold,
    each keeping all its examples where the time split put them; the catalogue is left whole."""
    found = sorted({str(u) for split in SPLITS for u in examples.splits[split]["user"]})
    if users > len(found):
        raise InputError(f"--users {users}: the data holds {len(found)} users with examples")
    chosen = set(random.Random(seed).sample(found, users))
    splits = {split: frame[frame["user"].astype(str).isin(chosen)].reset_index(drop=True)
              for split, frame in examples.splits.items()}
    note = f"a random subset of {users} of {len(found)} users (seed {seed})"
    return dataclasses.replace(examples, splits=splits, notes=[*examples.notes, note])


def pick_domain(cfg: Config, examples: SplitExamples) -> Domain:
    if cfg.domain:
        return DOMAINS[cfg.domain]
    if cfg.dataset.startswith("ml-"):
        return DOMAINS["movie"]
    if cfg.category or examples.category:
        return domain_for_category(cfg.category or examples.category)
    hint = examples.source.lower()
    for word, key in (("game", "game"), ("movie", "movie"), ("book", "book"), ("music", "music")):
        if word in hint:
            return DOMAINS[key]
    return DOMAINS["product"]


def _ids(keys: list[str], key_to_id: dict[str, int]) -> list[int]:
    return [key_to_id[k] for k in keys]


def split_tables(examples: SplitExamples, domain: Domain, layout: Layout,
                 written: Callable[[str], str] = str) -> dict[str, tuple[pd.DataFrame, list[dict]]]:
    """Per split: the D3 CSV frame and the instruction rows (with ids for row alignment) in
    ``layout``; the rows' titles pass through ``written`` (the CSVs keep the catalogue's)."""
    key_to_id = {key: i for i, (key, _) in enumerate(examples.catalog)}
    titles = [title for _, title in examples.catalog]
    out = {}
    for split in SPLITS:
        frame = examples.splits[split]
        hist_ids = [_ids(h, key_to_id) for h in frame["history"]]
        item_ids = [key_to_id[k] for k in frame["item"]]
        csv = pd.DataFrame({
            "user_id": frame["user"].astype(str),
            "item_asins": frame["history_asin"] if "history_asin" in frame else frame["history"],
            "item_asin": frame["asin"] if "asin" in frame else frame["item"],
            "history_item_id": hist_ids, "item_id": item_ids,
            "history_item_title": [[titles[i] for i in h] for h in hist_ids],
            "item_title": [titles[i] for i in item_ids],
            "history_rating": frame["history_rating"], "rating": frame["rating"],
            "history_timestamp": frame["history_timestamp"], "timestamp": frame["timestamp"],
        }, columns=CSV_COLUMNS)
        rows = []
        for r, (user, hist, item, htitles) in enumerate(zip(csv["user_id"], hist_ids, item_ids,
                                                            csv["history_item_title"], strict=True)):
            row = layout.row(domain, [written(t) for t in htitles], written(titles[item]))
            row.update(user_id=user, item_id=item, history_item_id=hist, row=r)
            rows.append(row)
        out[split] = (csv, rows)
    return out


def stats_for(cfg: Config, examples: SplitExamples, tables: dict, seconds: float) -> dict:
    users, items, interactions = set(), set(), set()
    times = []
    for split in SPLITS:
        frame = examples.splits[split]
        for user, hist, item, htime, t in zip(frame["user"], frame["history"], frame["item"],
                                              frame["history_timestamp"], frame["timestamp"], strict=True):
            users.add(user)
            items.update(hist)
            items.add(item)
            times.append(t)
            if htime and htime[0] is not None:
                times.append(htime[0])
    # Interactions: targets of all examples, plus the first example's history per user.
    firsts: dict[str, int] = {}
    per_user = collections.Counter()
    for split in SPLITS:
        frame = examples.splits[split]
        for user, hist in zip(frame["user"], frame["history"], strict=True):
            per_user[user] += 1
            firsts.setdefault(user, len(hist))
    interactions = sum(per_user.values()) + sum(firsts.values())
    title_counts = collections.Counter(title for _, title in examples.catalog)
    dup = {t: c for t, c in title_counts.items() if c > 1}
    numeric = [t for t in times if isinstance(t, int | float)]
    is_unix = numeric and min(numeric) > 10**8
    fmt = (lambda t: datetime.fromtimestamp(t, UTC).isoformat()) if is_unix else (lambda t: t)  # noqa: E731
    return {
        "dataset": cfg.dataset, "source": examples.source,
        "users": len(users), "items": len(examples.catalog), "items_in_examples": len(items),
        "interactions": interactions,
        "examples": {s: len(examples.splits[s]) for s in SPLITS},
        "time_range": [fmt(min(numeric)), fmt(max(numeric))] if numeric else None,
        "time_is_position": not is_unix,
        "duplicate_titles": {"titles": len(dup), "items": sum(dup.values()),
                             "examples": sorted(dup, key=lambda t: (-dup[t], t))[:10]},
        "notes": examples.notes,
        "seconds": round(seconds, 2),
    }


def run(cfg: Config) -> dict:
    started = time.time()
    log.info("reading %s%s", cfg.dataset, f" from {cfg.source}" if cfg.source else "")
    examples = read_source(cfg)
    if cfg.users is not None:
        examples = sample_users(examples, cfg.users, cfg.seed)
    if any(len(examples.splits[s]) == 0 for s in SPLITS):
        empty = [s for s in SPLITS if len(examples.splits[s]) == 0]
        raise InputError(f"{cfg.dataset}: the {', '.join(empty)} split(s) would be empty "
                         f"({sum(len(f) for f in examples.splits.values())} examples in all)")
    domain = pick_domain(cfg, examples)
    tables = split_tables(examples, domain, get_layout(cfg.layout),
                          natural_title if cfg.prompt_titles == "natural" else str)
    with staged_dir(cfg.out, whole=True) as stage:
        write_text(stage / "id2name.txt", "".join(f"{title}\t{i}\n" for i, (_, title) in enumerate(examples.catalog)))
        for split, (csv, rows) in tables.items():
            csv.to_csv(stage / f"{split}.csv", index=False)
            write_json_rows(stage / f"{split}.json", rows)
            if split != "train":
                n = min(cfg.sample_rows, len(csv))
                # pandas' sample with random_state=42 picks the same rows as the reference notebooks.
                picked = csv.sample(n=n, random_state=cfg.seed).index.tolist()
                write_json_rows(stage / f"{split}_{cfg.sample_rows}.json", [rows[i] for i in picked])
        stats = stats_for(cfg, examples, tables, time.time() - started)
        write_json(stage / "stats.json", stats)
        settings = to_dict(cfg)
        if cfg.layout == "window":  # the default: a config.yaml without 'layout' means window
            del settings["layout"]
        if cfg.users is None:  # the default, every user: written only when a subset was drawn
            del settings["users"]
        write_yaml(stage / "config.yaml", {"stage": "prepare", **settings, "domain_wording": domain.plural})
    log.info("%s: %d users, %d items, %d interactions; examples %s -> %s (%.1fs)", cfg.dataset, stats["users"],
             stats["items"], stats["interactions"], stats["examples"], Path(cfg.out), time.time() - started)
    return 0
