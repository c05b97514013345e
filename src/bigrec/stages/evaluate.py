"""Grounding and all-rank evaluation (``bigrec evaluate``): step 2 of BIGRec.

Each row's top generation is embedded by the base model like the catalogue titles (see
:mod:`bigrec.stages.index`), every item is ranked by L2 distance, and NDCG@K / HR@K are computed
over the whole catalogue. With ``--popularity`` or ``--ci_scores`` the distances are also
re-weighted by ``d * (1 + s) ** (-gamma)``, gamma chosen on the validation results.

Rows of constrained decoding (``bigrec generate --decoding constrained``) carry
``predict_ids``: their beams' items are ranked first, in beam order, and the rest of the
catalogue follows by the distance to the top beam (:func:`bigrec.llm.decoding.rank_with_beams`);
re-weighting then orders only that rest. ``--all_beams`` leaves such rows as they are.

Outputs, all written at the end (atomically, nothing half-written on an error):
``OUTPUT`` (the reference metrics JSON plus ``"topk"``; re-weighted runs under clearly named
keys), ``OUTPUT.details.json`` (gammas, validation metrics, diagnostics, counts),
``OUTPUT.png`` (plot) and ``OUTPUT.config.yaml``. The table goes to stdout.

A row whose top generation is empty counts as a miss (and is counted in the details); the
re-weighted metrics are computed on the other rows and scaled by their share, which is the
same as counting the empty rows as misses.

Beside the paper's re-weighting, each kind also gets a weighted-sum variant, reported under its
own name (``+CI blend``, :func:`bigrec.grounding.reweighting.blend_ranks`, weight chosen on validation).

Every ranking (plain, single-gamma re-weighting, blend, ``--last_title``) also gets a 95% bootstrap
interval per metric@K, and with ``--compare`` a paired difference against another model's
scores on the same rows (:mod:`bigrec.evaluation.intervals`); the details keep each row's rank so that
any two results on the same rows can be compared later. ``--exclude_history`` leaves each
row's history items out of every ranking (:func:`bigrec.evaluation.metrics.seen_mask`); the default is
the reference protocol, which ranks them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from bigrec import io
from bigrec.config import ConfigError, option, to_dict
from bigrec.data.catalog import Catalog, UnknownTargetError, read_catalog, row_target
from bigrec.data.prompts import natural_title, normalize_title
from bigrec.evaluation.intervals import bootstrap_ci, paired_difference
from bigrec.evaluation.metrics import TOPK, ndcg_hr, ndcg_hr_many, seen_mask, target_id_lists, target_ranks
from bigrec.grounding.reweighting import (
    BLEND_GRID,
    GAMMA_GRID,
    apply_gamma,
    blend_ranks,
    l2_distances,
    popularity_counts,
    search_gamma,
)
from bigrec.llm.models import DEFAULT_MODEL
from bigrec.stages.index import (
    REFERENCE,
    Grounding,
    embed_texts,
    ensure_index,
    grounding_of,
    layer_option,
    pooling_option,
    title_text_option,
)

log = logging.getLogger(__name__)

MAX_PREDICTION_CHARS = 1000  # a generation is embedded up to here; longer ones ran on past any title


@dataclass
class Config:
    catalog: str = option(help="catalogue file (id2name.txt)")
    input_dir: str = option(help="folder of result JSON files from bigrec generate (or one file)")
    output: str = option(help="metrics JSON to write; .details.json, .png and .config.yaml go beside it")
    base_model: str = option(DEFAULT_MODEL, "base model that embeds generations and titles (no adapter)")
    valid_input_dir: str | None = option(None, "validation results for choosing gamma: same file names as "
                                               "--input_dir, or a single file for all")
    popularity: str | None = option(None, "train.csv of the prepared data (or its folder): re-weight by popularity")
    ci_scores: str | None = option(None, "a conventional model's score matrix for the test rows (.safetensors "
                                         "or .npy), or a folder of them (bigrec baseline's scores/)")
    valid_ci_scores: str | None = option(None, "score matrix for the validation rows (default: searched "
                                               "beside --ci_scores)")
    all_beams: bool = option(False, "ground every beam and keep each row's best rank (an oracle: plain metrics)")
    ground_beams: int = option(1, "free decoding: rank every item by its distance to the nearest of the first N "
                                  "beams (ties in beam order); 1 = the paper's top generation only", minimum=1)
    index_path: str | None = option(None, "item index to reuse or build (default: beside --output)")
    precision: str = option("auto", "auto (bf16 where native, else fp32), fp32, bf16 or fp16")
    batch_size: int = option(64, "texts per embedding forward pass", minimum=1)
    pooling: str = pooling_option()
    embed_layer: int = layer_option()
    title_text: str = title_text_option()
    exclude_history: bool = option(False, "leave each row's history items out of the ranking (the reference "
                                          "ranks them); needs rows with history_item_id")
    last_title: bool = option(False, "also rank by the user's last history title, grounded the same way: a "
                                     "content baseline with no generation")
    report: bool = option(False, "also write OUTPUT.html: the tables with intervals, diagnostics and the plot in "
                                 "one file that opens from disk", changes_output=False)
    compare: str | None = option(None, "another model's score matrix for the test rows (or bigrec baseline's "
                                       "scores/ folder): paired differences against it with intervals")

    def validate(self) -> None:
        if (self.popularity or self.ci_scores) and not self.valid_input_dir:
            raise ConfigError("--popularity and --ci_scores need --valid_input_dir: gamma is chosen on validation")


@dataclass
class Results:
    """One result file: its rows, their targets, and each row's generations (normalised titles)."""

    path: Path
    rows: list[dict]
    targets: list[list[int]]  # per row, every catalogue id with the target's title
    beams: list[list[str]]
    first: list[list[int]] | None = None  # per row, its beams' item ids in beam order ([] without predict_ids)
    has_ids: list[bool] | None = None  # per row: did it carry predict_ids
    unknown_targets: list[str] | None = None  # skipped rows whose target title is not in the catalogue
    histories: list[list[int]] | None = None  # per row, its history's item ids (None: a row lacks them)

    @property
    def decoding(self) -> str:
        """constrained (every row has predict_ids), free (none has) or mixed."""
        ids = sum(self.has_ids or [])
        return "constrained" if ids == len(self.rows) else "free" if ids == 0 else "mixed"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def top1(self) -> list[str]:
        return [b[0] for b in self.beams]


def result_files(spec: str | Path, exclude: set[Path] = frozenset()) -> list[Path]:
    spec = Path(spec)
    if spec.is_file():
        return [spec]
    if not spec.is_dir():
        raise FileNotFoundError(f"results not found: {spec}")
    skip = {p.resolve() for p in exclude}
    files = sorted(p for p in spec.glob("*.json") if p.resolve() not in skip)
    if not files:
        raise FileNotFoundError(f"{spec}: no result files (*.json)")
    return files


def read_results(path: Path, catalog: Catalog) -> Results:
    """Rows with a non-empty ``predict`` list of strings and a target in the catalogue."""
    rows = io.read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of result rows, got {type(rows).__name__}")
    if not rows:
        raise ValueError(f"{path}: no result rows")
    targets, beams, first, has_ids, kept, unknown, histories = [], [], [], [], [], [], []
    cut = 0
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        predict = row.get("predict")
        if predict is None:
            raise ValueError(f"{where}: no 'predict' field; run bigrec generate on this file first")
        if not isinstance(predict, list) or not predict or not all(isinstance(p, str) for p in predict):
            raise ValueError(f"{where}: field 'predict' must be a non-empty list of strings, got {predict!r}")
        try:
            targets.append(row_target(row, catalog, where))
        except UnknownTargetError as exc:
            unknown.append(str(exc))
            continue
        kept.append(row)
        histories.append(_history_ids(row.get("history_item_id"), len(catalog), where))
        beams.append([normalize_title(p[:MAX_PREDICTION_CHARS * 2])[:MAX_PREDICTION_CHARS] for p in predict])
        cut += any(len(p) > MAX_PREDICTION_CHARS for p in predict)
        ids = row.get("predict_ids")
        has_ids.append(ids is not None)
        first.append([] if ids is None else _beam_ids(ids, len(predict), len(catalog), where))
    if cut:
        log.warning("%s: %d rows hold a generation longer than %d characters; cut there (no title is that long)",
                    path, cut, MAX_PREDICTION_CHARS)
    if unknown:
        log.warning("%s: %d of %d rows have a target that is not in the catalogue and are left out of the "
                    "metrics; first: %s", path, len(unknown), len(rows), unknown[0])
    if not kept:
        raise ValueError(f"{path}: no row has a target in {catalog.path} ({unknown[0]})")
    return Results(path, kept, target_id_lists(targets, catalog.titles), beams, first, has_ids, unknown,
                   None if any(h is None for h in histories) else histories)


def _history_ids(ids: object, num_items: int, where: str) -> list[int] | None:
    """A row's ``history_item_id`` (None when the row has none, as reference-format files)."""
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_items
                                            for i in ids):
        raise ValueError(f"{where}: field 'history_item_id' must be a list of catalogue ids (0..{num_items - 1}), "
                         f"got {ids!r}")
    return ids


def need_histories(results: Results, why: str) -> list[list[int]]:
    if results.histories is None:
        raise ValueError(f"{results.path}: {why} needs 'history_item_id' on every row (rows of bigrec prepare "
                         "carry it)")
    return results.histories


def _beam_ids(ids: object, beams: int, num_items: int, where: str) -> list[int]:
    """A row's ``predict_ids`` (a list of id lists, one per beam), flattened in beam order."""
    if not isinstance(ids, list) or len(ids) != beams or not all(
            isinstance(b, list) and b and all(isinstance(i, int) and not isinstance(i, bool) for i in b) for b in ids):
        raise ValueError(f"{where}: field 'predict_ids' must be a list of {beams} non-empty lists of item ids "
                         "(one per 'predict' beam)")
    flat = [i for b in ids for i in b]
    if not all(0 <= i < num_items for i in flat):
        raise ValueError(f"{where}: 'predict_ids' {ids!r} holds ids outside the catalogue (0..{num_items - 1})")
    return flat


class Embedder:
    """Embeds generations, each distinct text once (generations repeat a lot).

    A generation that is exactly a catalogue title takes that title's row of the index: the
    same text through the same model, so the same vector up to rounding, at no cost.
    """

    def __init__(self, model, tokenizer, batch_size: int, known: dict[str, torch.Tensor] | None = None,
                 grounding: Grounding = REFERENCE):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.grounding = grounding
        self.cache: dict[str, torch.Tensor] = dict(known or {})
        self.seconds = 0.0  # spent embedding, for the timing log

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), D]; empty texts get zero rows (the caller makes them misses)."""
        new = sorted({t for t in texts if t and t not in self.cache})
        if new:
            start = time.perf_counter()
            for text, vec in zip(new, embed_texts(self.model, self.tokenizer, new, self.batch_size,
                                                          self.grounding), strict=True):
                self.cache[text] = vec
            self.seconds += time.perf_counter() - start
        dim = self.model.config.hidden_size
        return torch.stack([self.cache[t] if t else torch.zeros(dim) for t in texts])


def ground(texts: list[str], targets: list[list[int]], items: torch.Tensor, embed: Embedder,
           exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 distances [R, N] of each text to every item, the targets' ranks [R] and the empty mask [R].

    An empty text is a miss: its rank is beyond the catalogue and every K. ``exclude`` [R, N]:
    items left out of the ranking.
    """
    dist = l2_distances(embed(texts), items)
    ranks = target_ranks(dist, targets, exclude=exclude)
    empty = torch.tensor([not t for t in texts])
    ranks[empty] = max(items.shape[0], *TOPK)
    return dist, ranks, empty


def _keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x[keep] if x.dim() == 2 else x  # a popularity vector serves every row


def _scaled(metrics: dict[str, list[float]], factor: float) -> dict[str, list[float]]:
    return {key: [v * factor for v in values] for key, values in metrics.items()}


def history_copy_share(results: Results, catalog: Catalog) -> float | None:
    """Share of rows whose top generation is a title from the row's own history (as written in the
    catalogue or with its article in front). A model can look useful by echoing the history and
    letting grounding find titles near it; this says how often it does. None without histories."""
    if results.histories is None:
        return None
    copies = 0
    for top, history in zip(results.top1, results.histories, strict=True):
        titles = {catalog.titles[i] for i in history}
        copies += bool(top) and (top in titles or top in {natural_title(t) for t in titles})
    return copies / len(results.top1)


def diagnostics(results: Results, catalog: Catalog) -> dict:
    """How varied and how grounded the top generations are (homogeneity shows here first)."""
    top = results.top1
    counts = Counter(top)
    n = len(top)
    return {"rows": n, "decoding": results.decoding, "empty_top1": sum(1 for t in top if not t),
            "history_copy_top1_share": history_copy_share(results, catalog),
            "unknown_targets_skipped": len(results.unknown_targets or []),
            "distinct_top1_share": len([t for t in counts if t]) / n,
            "exact_title_top1_share": sum(c for t, c in counts.items() if t and catalog.is_title(t)) / n,
            "most_frequent_top1": [[t, c] for t, c in counts.most_common(10)]}


def popularity_scores(spec: str | Path, num_items: int) -> torch.Tensor:
    """Training counts [N] of each target item in ``train.csv`` (a file, or the folder holding it)."""
    import pandas as pd

    path = Path(spec)
    path = path / "train.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"popularity: training split not found: {path}")
    try:
        ids = pd.read_csv(path, usecols=["item_id"])["item_id"]
    except ValueError as exc:
        raise ValueError(f"{path}: cannot read column 'item_id': {exc}") from exc
    if ids.isna().any():
        raise ValueError(f"{path}: column 'item_id' has {int(ids.isna().sum())} empty values")
    try:
        return popularity_counts(torch.tensor(ids.to_numpy(dtype="int64")), num_items).float()
    except ValueError as exc:
        raise ValueError(f"{path}: column 'item_id': {exc} (is this the catalogue's training split?)") from exc


def ci_matrix(spec: Path, results: Results, role: str, num_items: int) -> tuple[torch.Tensor, Path]:
    """The score matrix aligned to ``results``: ``spec`` itself, or the first file in folder ``spec``
    whose rows match (preferring the result file's stem, then names starting with ``role``)."""
    from bigrec.evaluation.scores import load_scores

    if spec.is_file():
        candidates = [spec]
    elif spec.is_dir():
        stem = results.path.stem
        candidates = sorted(spec.glob("*.safetensors"),
                            key=lambda p: (p.stem != stem, not p.stem.startswith(role), p.name))
    else:
        raise FileNotFoundError(f"score matrix not found: {spec}")
    problems = []
    for path in candidates:
        try:
            scores = load_scores(path).align(results.rows)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if scores.shape[1] != num_items:
            raise ValueError(f"{path}: {scores.shape[1]} item columns, but the catalogue has {num_items} items")
        return scores, path
    raise ValueError(f"no score matrix in {spec} matches the rows of {results.path}: "
                     + ("; ".join(problems[:3]) or "no .safetensors files"))


def pair_valid(test: Results, valid: list[Results]) -> Results:
    same = [v for v in valid if v.name == test.name]
    if same:
        return same[0]
    if len(valid) == 1:
        return valid[0]
    raise ConfigError(f"no validation results for {test.path}: expected {test.name} among "
                      f"{', '.join(v.name for v in valid)}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text).rstrip("/")).name) or "model"


def _rows(x: list, keep: torch.Tensor) -> list:
    return [v for v, k in zip(x, keep.tolist(), strict=True) if k]


def reweighted(dist: torch.Tensor, empty: torch.Tensor, scores: torch.Tensor, targets: list[list[int]],
               valid_dist: torch.Tensor, valid_empty: torch.Tensor, valid_scores: torch.Tensor,
               valid_targets: list[list[int]], first: list[list[int]] | None = None,
               valid_first: list[list[int]] | None = None, exclude: torch.Tensor | None = None,
               valid_exclude: torch.Tensor | None = None) -> dict:
    """Gamma searched on validation, applied to test; empty generations stay misses.

    ``first`` / ``valid_first``: per row, constrained beams' items, ranked ahead of the rest at
    every gamma; ``exclude`` / ``valid_exclude`` [R, N]: items left out of the ranking. Returns
    :func:`bigrec.grounding.reweighting.apply_gamma`'s dict plus the validation metrics; ``single_ranks`` [R]
    covers every test row (empty rows as misses).
    """
    keep, valid_keep = ~empty, ~valid_empty

    def kept(x: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor | None:
        return None if x is None else x[k]

    if not valid_keep.any():
        raise ValueError("every top generation of the validation results is empty; cannot choose gamma")
    search = search_gamma(valid_dist[valid_keep], _keep(valid_scores, valid_keep), _rows(valid_targets, valid_keep),
                          TOPK, GAMMA_GRID, first=None if valid_first is None else _rows(valid_first, valid_keep),
                          exclude=kept(valid_exclude, valid_keep))
    single_ranks = torch.full((len(keep),), max(dist.shape[1], *TOPK), dtype=torch.long)
    if keep.any():
        out = apply_gamma(dist[keep], _keep(scores, keep), _rows(targets, keep), search,
                          first=None if first is None else _rows(first, keep), exclude=kept(exclude, keep))
        single_ranks[keep] = out["single_ranks"]
    else:
        zeros = {"NDCG": [0.0] * len(TOPK), "HR": [0.0] * len(TOPK)}
        out = {"tuned": zeros, "single": zeros, "gammas": {"NDCG": [search.ndcg_gamma[k] for k in TOPK],
                                                           "HR": [search.hr_gamma[k] for k in TOPK],
                                                           "single": search.single_gamma}}
    share, valid_share = int(keep.sum()) / len(keep), int(valid_keep.sum()) / len(valid_keep)
    blend = None
    if first is None and valid_first is None:  # constrained rows rank their beams first: no blend
        valid_ndcg = ndcg_hr_many(blend_ranks(valid_dist[valid_keep], _keep(valid_scores, valid_keep),
                                              _rows(valid_targets, valid_keep), BLEND_GRID,
                                              kept(valid_exclude, valid_keep)), (10,))[0]
        best = max(range(len(BLEND_GRID)), key=lambda i: (valid_ndcg[i][0], -i))
        blend = {"weight": BLEND_GRID[best], "valid_ndcg10": valid_ndcg[best][0] * valid_share,
                 "ranks": single_ranks.clone()}
        if keep.any():
            blend["ranks"][keep] = blend_ranks(dist[keep], _keep(scores, keep), _rows(targets, keep),
                                               [BLEND_GRID[best]], kept(exclude, keep))[0]
    return {"tuned": _scaled(out["tuned"], share), "single": _scaled(out["single"], share),
            "single_ranks": single_ranks, "blend": blend, "gammas": out["gammas"], "single_k": search.single_k,
            "valid_tuned": _scaled(search.valid_tuned, valid_share),
            "valid_single": _scaled(search.valid_single, valid_share)}


def nearest_beam_distances(beams: list[list[str]], items: torch.Tensor, embed: Embedder,
                           count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances [R, N] of each item to the nearest of a row's first ``count`` non-empty beams, and
    the mask [R] of rows with none.

    Beam b's distances are offset by b * 1e-6 of the row's distance scale, so an item that is
    exactly a beam's title ranks in beam order, ahead of everything that is no beam at all.
    """
    rows = len(beams)
    best = torch.full((rows, items.shape[0]), float("inf"))
    for b in range(count):
        texts = [row[b] if b < len(row) else "" for row in beams]
        dist = l2_distances(embed(texts), items)
        dist += b * 1e-6 * dist.amax(1, keepdim=True)
        dist[torch.tensor([not t for t in texts])] = float("inf")
        best = torch.minimum(best, dist)
    empty = torch.isinf(best).all(1)
    best[empty] = 0.0  # misses whatever their distances; finite for the re-weighting's min-max
    return best, empty


def ground_results(results: Results, items: torch.Tensor, embed: Embedder, exclude: torch.Tensor | None = None,
                   beams: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]] | None]:
    """:func:`ground` of the top generations (with ``beams`` > 1, of the nearest of the first
    ``beams``); rows with ``predict_ids`` rank their beams' items first.

    Returns distances [R, N], ranks [R], the empty mask [R] (a row with beam ids is never
    empty) and the beam items per row (None when no row has any; excluded items dropped).
    """
    from bigrec.llm.decoding import rank_with_beams

    if beams > 1:
        dist, empty = nearest_beam_distances(results.beams, items, embed, beams)
        ranks = target_ranks(dist, results.targets, exclude=exclude)
        ranks[empty] = max(items.shape[0], *TOPK)
    else:
        dist, ranks, empty = ground(results.top1, results.targets, items, embed, exclude)
    if not any(results.has_ids or []):
        return dist, ranks, empty, None
    first = results.first if exclude is None else [
        [i for i in ids if not exclude[r, i]] for r, ids in enumerate(results.first)]
    has = torch.tensor(results.has_ids)
    ranks = torch.where(has, target_ranks(rank_with_beams(first, dist), results.targets, exclude=exclude), ranks)
    return dist, ranks, empty & ~has, first


def excluded(results: Results, config: Config, num_items: int) -> torch.Tensor | None:
    """The seen-items mask [R, N] of ``results`` under ``--exclude_history``, else None."""
    if not config.exclude_history:
        return None
    return seen_mask(need_histories(results, "--exclude_history"), results.targets, num_items)


def last_title_ranks(results: Results, items: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """Ranks [R] of the content baseline: every item by L2 distance to the row's last history title.

    The index row of that item is the title embedded exactly as a generation of it would be.
    A row with no history is a miss.
    """
    histories = need_histories(results, "--last_title")
    last = torch.tensor([h[-1] if h else 0 for h in histories])
    ranks = target_ranks(l2_distances(items[last], items), results.targets, exclude=exclude)
    ranks[torch.tensor([not h for h in histories])] = max(items.shape[0], *TOPK)
    return ranks


def intervals(ranks: dict[str, torch.Tensor], other: torch.Tensor | None) -> dict[str, dict]:
    """Per run: its bootstrap interval and, with ``other`` ranks, the paired difference against them."""
    out = {}
    for run, r in ranks.items():
        out[run] = {"ci": bootstrap_ci(r, TOPK)}
        if other is not None:
            out[run]["paired"] = paired_difference(r, other, TOPK)
    return out


def write_report(output: Path, metrics: dict, details: dict) -> Path:
    """OUTPUT.html: per result file, its runs with 95% intervals, the paired differences, diagnostics."""
    from html import escape

    from bigrec.evaluation.report import html_table, metrics_rows, with_interval, write_html

    k10 = TOPK.index(10)

    body = [f"<p>Grounding: {escape(details['grounding'])}; {details['num_items']} items; "
            f"{'seen items left out' if details['exclude_history'] else 'every item ranked'}.</p>"]
    for name, info in details["files"].items():
        runs = {run: m for run, m in metrics.items() if run != "topk" and run.startswith(name)}
        body += [f"<h2>{escape(name)}</h2>", html_table(*metrics_rows(runs, info["intervals"]))]
        if "compare" in info:
            body.append("<ul>" + "".join(
                f"<li>{escape(run)} minus {escape(Path(info['compare']['scores']).name)}: NDCG@10 "
                f"{with_interval(iv['paired']['NDCG']['diff'][k10], iv['paired']['NDCG']['ci'][k10], signed=True)}</li>"
                for run, iv in info["intervals"].items()) + "</ul>")
        body.append(html_table(["diagnostic", "value"], [[k, v] for k, v in info["diagnostics"].items()], 2))
    return write_html(output.with_suffix(".html"), f"bigrec evaluate: {output.name}", body,
                      {"NDCG@K and HR@K": output.with_suffix(".png")})


def run(config: Config) -> dict:
    from bigrec.evaluation.report import format_intervals, format_table, metrics_json, plot_metrics
    from bigrec.llm.models import load_model

    output = Path(config.output)
    details_path = output.with_name(output.stem + ".details.json")
    catalog = read_catalog(config.catalog)
    n = len(catalog)
    tests = [read_results(p, catalog) for p in result_files(config.input_dir, {output, details_path})]
    # (test scores, valid scores, where from) per kind and test file; read before the slow part
    weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, dict]]] = {}
    if config.popularity or config.ci_scores:
        valids = [read_results(p, catalog) for p in result_files(config.valid_input_dir)]
        pairs = {t.name: pair_valid(t, valids) for t in tests}
    if config.popularity:
        pop = popularity_scores(config.popularity, n)
        weights["popularity"] = {t.name: (pop, pop, {"train_csv": config.popularity}) for t in tests}
    if config.ci_scores:
        spec = Path(config.ci_scores)
        valid_spec = Path(config.valid_ci_scores) if config.valid_ci_scores else (spec.parent if spec.is_file() else spec)
        weights["CI"] = {}
        for t in tests:
            (scores, src), (valid_scores, valid_src) = ci_matrix(spec, t, "test", n), ci_matrix(
                valid_spec, pairs[t.name], "valid", n)
            weights["CI"][t.name] = (scores, valid_scores, {"ci_scores": str(src), "valid_ci_scores": str(valid_src)})
    others: dict[str, tuple[torch.Tensor, str]] = {}  # test file -> ranks of the --compare model, its file
    for t in tests if config.compare else ():
        scores, src = ci_matrix(Path(config.compare), t, "test", n)
        others[t.name] = (target_ranks(scores, t.targets, higher_is_better=True, exclude=excluded(t, config, n)),
                          str(src))
    for t in tests if config.exclude_history or config.last_title else ():
        need_histories(t, "--exclude_history" if config.exclude_history else "--last_title")

    model, tokenizer = load_model(config.base_model, config.precision)
    grounding = grounding_of(config)
    variant = "" if grounding == REFERENCE else f".{grounding.pooling}-{grounding.layer}-{grounding.text}"
    index_path = Path(config.index_path or output.parent / f"index.{_slug(config.base_model)}{variant}.safetensors")
    items = ensure_index(config.base_model, catalog.path, index_path, config.precision, model=model,
                         tokenizer=tokenizer, batch_size=config.batch_size, grounding=grounding)
    embed = Embedder(model, tokenizer, config.batch_size,
                     known={title: items[ids[0]] for title, ids in catalog.ids_by_title.items()}, grounding=grounding)
    runs: dict[str, dict] = {}
    details: dict = {"topk": list(TOPK), "index": str(index_path), "grounding": grounding.describe(),
                     "catalog": str(catalog.path),
                     "num_items": n, "all_beams": config.all_beams, "ground_beams": config.ground_beams,
                     "exclude_history": config.exclude_history,
                     "files": {}}
    for test in tests:
        start, embedded = time.perf_counter(), embed.seconds
        exclude = excluded(test, config, n)
        dist, ranks, empty, first = ground_results(test, items, embed, exclude, config.ground_beams)  # [R, N], [R], [R]
        if config.all_beams:
            has = torch.tensor(test.has_ids)  # constrained rows already rank every beam's items
            for k in range(1, max(len(b) for b in test.beams)):
                texts = [b[min(k, len(b) - 1)] for b in test.beams]
                ranks = torch.where(has, ranks, torch.minimum(ranks, ground(texts, test.targets, items, embed,
                                                                            exclude)[1]))
        runs[test.name] = ndcg_hr(ranks, TOPK)
        row_ranks = {test.name: ranks}  # run -> per-row ranks of every single ranking
        if config.last_title:
            row_ranks[f"{test.name} last history title"] = last_title_ranks(test, items, exclude)
            runs[f"{test.name} last history title"] = ndcg_hr(row_ranks[f"{test.name} last history title"], TOPK)
        info: dict = {"diagnostics": diagnostics(test, catalog)}
        log.info("%s: %d rows grounded in %.1fs (%.1fs embedding generations that are not titles)", test.name,
                 len(test.rows), time.perf_counter() - start, embed.seconds - embedded)
        if weights:
            valid = pairs[test.name]
            info["valid_file"] = str(valid.path)
            valid_exclude = excluded(valid, config, n)
            valid_dist, valid_ranks, valid_empty, valid_first = ground_results(valid, items, embed, valid_exclude,
                                                                               config.ground_beams)
            info["valid_plain"] = ndcg_hr(valid_ranks, TOPK)  # to compare with the re-weightings' validation
        for kind, per_file in weights.items():
            start = time.perf_counter()
            scores, valid_scores, sources = per_file[test.name]
            out = reweighted(dist, empty, scores, test.targets, valid_dist, valid_empty, valid_scores, valid.targets,
                             first, valid_first, exclude, valid_exclude)
            single = f"{test.name} +{kind} (gamma by NDCG@{out['single_k']})"
            runs[f"{test.name} +{kind} (gamma per metric@K)"] = out.pop("tuned")
            runs[single] = out.pop("single")
            row_ranks[single] = out.pop("single_ranks")
            blend = out.pop("blend")
            if blend is not None:
                name = f"{test.name} +{kind} blend (weight by NDCG@10)"
                row_ranks[name] = blend.pop("ranks")
                runs[name] = ndcg_hr(row_ranks[name], TOPK)
                out["blend"] = blend
            info[kind] = {**sources, **out}
            log.info("%s +%s: gamma searched and applied in %.1fs", test.name, kind, time.perf_counter() - start)
        other, other_src = others.get(test.name, (None, None))
        info["intervals"] = intervals(row_ranks, other)
        if other is not None:
            info["compare"] = {"scores": other_src, "ci": bootstrap_ci(other, TOPK)}
        info["rows"] = [r.get("row") for r in test.rows]
        info["ranks"] = {run: r.tolist() for run, r in row_ranks.items()}
        details["files"][test.name] = info

    metrics = metrics_json(runs, TOPK)
    table = format_table(metrics, TOPK)
    io.write_json(output, metrics)
    io.write_json(details_path, details)
    plot_metrics(metrics, output.with_suffix(".png"), TOPK)
    io.write_yaml(output.with_name(output.stem + ".config.yaml"), to_dict(config))
    if config.report:
        write_report(output, metrics, details)
    sys.stdout.write(table + "\n")
    for info in details["files"].values():
        against = Path(info["compare"]["scores"]).name if "compare" in info else None
        sys.stdout.write("\n" + format_intervals(metrics, info["intervals"], TOPK, (10,), against) + "\n")
    for name, info in details["files"].items():
        d = info["diagnostics"]
        copies = d["history_copy_top1_share"]
        log.info("%s (%s decoding): distinct top-1 %.1f%%, exact catalogue titles %.1f%%, copies of a history title "
                 "%s, empty %d; most frequent: %s", name, d["decoding"], 100 * d["distinct_top1_share"],
                 100 * d["exact_title_top1_share"], "n/a" if copies is None else f"{100 * copies:.1f}%", d["empty_top1"],
                 ", ".join(f"{t!r} x{c}" for t, c in d["most_frequent_top1"][:3]))
    return metrics
