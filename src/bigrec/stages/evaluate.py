"""Grounding and all-rank evaluation (``bigrec evaluate``): step 2 of BIGRec.

Each row's top generation is embedded by the base model like the catalogue titles (see
:mod:`bigrec.stages.index`), every item is ranked by L2 distance, and NDCG@K / HR@K are computed
over the whole catalogue. With ``--popularity`` or ``--ci_scores`` the distances are also
re-weighted by ``d * (1 + s) ** (-gamma)``, gamma chosen on the validation results.

Rows of constrained decoding (``bigrec generate --decoding constrained``) carry
``predict_ids``: their beams' items are ranked first, in beam order, and the rest of the
catalogue follows by the distance to the top beam (:func:`bigrec.grounding.ranking.rank_with_beams`);
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

Likelihood rows generated with ``--cf_scores`` carry SASRec's candidates too (``cf_ids``, ``cf_logp``):
with ``--cf_scores`` here (the same score files) they are also ranked as likelihood + SASRec,
``log p(title) + w * minmax(s)`` over both lists' titles (:mod:`bigrec.grounding.likelihood_cf`), w chosen
on the validation rows' NDCG@10 (``+SASRec (weight by NDCG@10)``).

Every ranking (plain, single-gamma re-weighting, blend, likelihood + SASRec, ``--last_title``) also gets a 95% bootstrap
interval per metric@K, and with ``--compare`` a paired difference against another model's
scores on the same rows (:mod:`bigrec.evaluation.intervals`); the details keep each row's expected rank
and tie count so that any two results on the same rows can be compared later. A target level with
other items (not of its own title) takes every metric's expectation under random tie-breaking
(:mod:`bigrec.evaluation.metrics`); how many targets were tied is counted per run and printed. ``--exclude_history`` leaves each
row's history out of every ranking: every id sharing a title with a history item, the rule the decoders
and the service follow (:meth:`bigrec.data.catalog.Catalog.history_titles`,
:func:`bigrec.evaluation.results.history_mask`); the default is the reference protocol, which ranks them.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigrec import io
from bigrec.config import ConfigError, option, to_dict
from bigrec.data.catalog import Catalog, read_catalog
from bigrec.evaluation.intervals import bootstrap_ci, rank_intervals
from bigrec.evaluation.metrics import TOPK, Ranks, ndcg_hr, target_ranks
from bigrec.evaluation.report import write_evaluation_report
from bigrec.evaluation.results import (
    Results,
    diagnostics,
    history_mask,
    need_histories,
    pair_valid,
    read_results,
    result_files,
)
from bigrec.evaluation.runs import RunKey
from bigrec.evaluation.scores import ci_matrix
from bigrec.grounding.embedding import REFERENCE, Embedder
from bigrec.grounding.index import ensure_index
from bigrec.grounding.likelihood_cf import (
    CONTENT_GRID,
    WEIGHT_GRID,
    Candidates,
    candidates_of,
    choose_weights,
    last_title_content,
)
from bigrec.grounding.likelihood_cf import blend_ranks as blend_cf_ranks
from bigrec.grounding.options import grounding_of, layer_option, pooling_option, title_text_option
from bigrec.grounding.ranking import ground, ground_results, last_title_ranks
from bigrec.grounding.reweighting import popularity_scores, reweighted
from bigrec.io import InputError
from bigrec.llm.defaults import EMBED_BATCH_SIZE, EXCLUDE_HISTORY, PRECISION
from bigrec.llm.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass
class Config:
    catalog: str = option(help="catalogue file (id2name.txt)")
    input_dir: str = option(help="folder of result JSON files from bigrec generate (or one file)")
    output: str = option(help="metrics JSON to write; .details.json, .png and .config.yaml go beside it")
    base_model: str = option(DEFAULT_MODEL, "base model that embeds generations and titles (no adapter)")
    valid_input_dir: str | None = option(None, "validation results (for choosing gamma, and evaluated plain "
                                               "beside it): same file names as --input_dir, or a single file for all")
    popularity: str | None = option(None, "train.csv of the prepared data (or its folder): re-weight by popularity")
    ci_scores: str | None = option(None, "a conventional model's score matrix for the test rows (.safetensors "
                                         "or .npy), or a folder of them (bigrec baseline's scores/)")
    valid_ci_scores: str | None = option(None, "score matrix for the validation rows (default: searched "
                                               "beside --ci_scores)")
    cf_scores: str | None = option(None, "likelihood rows that carry SASRec's candidates (generate --decoding "
                                         "likelihood --cf_scores): the score matrix (or folder) generation read; "
                                         "ranks them as likelihood + SASRec, the weight chosen on validation")
    valid_cf_scores: str | None = option(None, "score matrix for the validation rows (default: searched beside "
                                               "--cf_scores)")
    all_beams: bool = option(False, "ground every beam and keep each row's best rank (an oracle: plain metrics)")
    ground_beams: int = option(1, "free decoding: rank every item by its distance to the nearest of the first N "
                                  "beams (ties in beam order); 1 = the paper's top generation only", minimum=1)
    index_path: str | None = option(None, "item index to reuse or build (default: beside --output)")
    precision: str = option(PRECISION, "auto (bf16 where native, else fp32), fp32, bf16 or fp16")
    batch_size: int = option(EMBED_BATCH_SIZE, "texts per embedding forward pass", minimum=1)
    pooling: str = pooling_option()
    embed_layer: int = layer_option()
    title_text: str = title_text_option()
    exclude_history: bool = option(EXCLUDE_HISTORY, "leave each row's history items out of the ranking (the reference "
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
        if self.cf_scores and not self.valid_input_dir:
            raise ConfigError("--cf_scores needs --valid_input_dir: the weight is chosen on validation")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(text).rstrip("/")).name) or "model"


def excluded(results: Results, config: Config, catalog: Catalog) -> torch.Tensor | None:
    """The seen-items mask [R, N] of ``results`` under ``--exclude_history`` (:func:`history_mask`), else None."""
    if not config.exclude_history:
        return None
    return history_mask(need_histories(results, "--exclude_history"), results.targets, catalog)


# (test scores, valid scores, where from) per re-weighting kind and test file
Weights = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, dict]]]


def read_weights(config: Config, tests: list[Results], catalog: Catalog) -> tuple[Weights, dict[str, Results]]:
    """The re-weightings' scores for every test file, and its validation results wherever
    ``--valid_input_dir`` names them (read before the slow part)."""
    n = len(catalog)
    weights: Weights = {}
    pairs: dict[str, Results] = {}
    if config.valid_input_dir:
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
    return weights, pairs


def likelihood_candidates(results: Results) -> list[Candidates] | None:
    """Each row's candidates for likelihood + SASRec (its ranked titles and SASRec's), or None for a
    file whose rows carry no ``cf_ids``; a file where only some rows do is refused."""
    try:
        found = [candidates_of(row) if row.get("predict_ids") is not None else None for row in results.rows]
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{results.path}: cf_ids and cf_logp must be a list of item id lists and a list of "
                         f"as many numbers ({type(exc).__name__}: {exc})") from None
    if all(c is None for c in found):
        return None
    if any(c is None for c in found):
        raise InputError(f"{results.path}: some rows carry SASRec's candidates (cf_ids) and some do not; "
                         "generate the file again")
    return found


def read_cf(config: Config, tests: list[Results], pairs: dict[str, Results],
            n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, dict]]:
    """Per test file whose rows carry SASRec's candidates: SASRec's scores for its rows and its
    validation rows (``--cf_scores``), and where they came from."""
    out = {}
    if not config.cf_scores:
        return out
    spec = Path(config.cf_scores)
    valid_spec = Path(config.valid_cf_scores) if config.valid_cf_scores else (spec.parent if spec.is_file() else spec)
    for t in tests:
        if likelihood_candidates(t) is None:
            log.warning("%s: no row carries SASRec's candidates (cf_ids); --cf_scores does not apply to it", t.path)
            continue
        if likelihood_candidates(pairs[t.name]) is None:
            raise InputError(f"{pairs[t.name].path}: its rows carry no SASRec candidates (cf_ids), those of "
                             f"{t.path} do: generate the validation rows with --cf_scores too")
        (scores, src), (valid_scores, valid_src) = ci_matrix(spec, t, "test", n), ci_matrix(
            valid_spec, pairs[t.name], "valid", n)
        out[t.name] = (scores, valid_scores, {"cf_scores": str(src), "valid_cf_scores": str(valid_src)})
    return out


def likelihood_cf_ranks(test: Results, valid: Results, scores: torch.Tensor, valid_scores: torch.Tensor,
                        exclude: torch.Tensor | None, valid_exclude: torch.Tensor | None,
                        items: torch.Tensor) -> tuple[Ranks, dict]:
    """The test rows' ranks under likelihood + SASRec (+ the last title's content term where both files'
    rows carry their histories), the weights chosen on the validation rows by NDCG@10, and what the
    choice saw (the grids, validation NDCG@10 at each pair, the weights, their NDCG@10 and the terms kept)."""
    content = valid_content = None
    if test.histories is not None and valid.histories is not None:
        content, valid_content = last_title_content(test.histories, items), last_title_content(valid.histories, items)
    try:
        weight, content_weight, ndcg = choose_weights(likelihood_candidates(valid), valid_scores, valid.targets,
                                                      WEIGHT_GRID, valid_exclude, valid_content, CONTENT_GRID)
        ranks = blend_cf_ranks(likelihood_candidates(test), scores, test.targets, [weight], exclude, content,
                               content_weight)[0]
    except ValueError as exc:
        raise InputError(f"{test.path}: likelihood + SASRec: {exc}") from None
    grid = list(CONTENT_GRID) if content is not None else [0.0]
    row = ndcg[grid.index(content_weight)]
    terms = ["likelihood"] + (["SASRec"] if weight else []) + (["last title"] if content_weight else [])
    return ranks, {"weight": weight, "content_weight": content_weight, "terms": terms, "grid": list(WEIGHT_GRID),
                   "content_grid": grid, "valid_grid_ndcg10": row, "valid_content_grid_ndcg10": ndcg,
                   "valid_ndcg10": row[WEIGHT_GRID.index(weight)]}


def compared_ranks(config: Config, tests: list[Results], catalog: Catalog) -> dict[str, tuple[Ranks, str]]:
    """Per test file, the ``--compare`` model's ranks of the targets and the score file they came from."""
    others = {}
    for t in tests if config.compare else ():
        scores, src = ci_matrix(Path(config.compare), t, "test", len(catalog))
        others[t.name] = (target_ranks(scores, t.targets, higher_is_better=True, exclude=excluded(t, config, catalog)),
                          str(src))
    return others


def plain_ranks(test: Results, config: Config, items: torch.Tensor, embed: Embedder, exclude: torch.Tensor | None):
    """:func:`ground_results` of ``test``; with ``--all_beams`` each free row keeps its best beam's rank."""
    dist, ranks, empty, first = ground_results(test, items, embed, exclude, config.ground_beams)  # [R, N], [R], [R]
    if config.all_beams:
        has = torch.tensor(test.has_ids)  # constrained rows already rank every beam's items
        for k in range(1, max(len(b) for b in test.beams)):
            texts = [b[min(k, len(b) - 1)] for b in test.beams]
            ranks = ranks.where(has, ranks.best_of(ground(texts, test.targets, items, embed, exclude)[1]))
    return dist, ranks, empty, first


def evaluate_file(test: Results, config: Config, catalog: Catalog, items: torch.Tensor, embed: Embedder,
                  weights: Weights, valid: Results | None, other: tuple[Ranks, str] | None,
                  cf: tuple[torch.Tensor, torch.Tensor, dict] | None = None) -> tuple[dict, dict]:
    """Every ranking of one result file -> (metrics per run, the file's details: diagnostics,
    re-weighting choices, intervals and per-row ranks)."""
    len(catalog)
    start, embedded = time.perf_counter(), embed.seconds
    exclude = excluded(test, config, catalog)
    dist, ranks, empty, first = plain_ranks(test, config, items, embed, exclude)
    keys = [RunKey(test.name)]  # what every ranking is (its label is made from these fields)
    row_ranks = {keys[0].label: ranks}  # run -> per-row ranks of every single ranking
    if config.last_title:
        keys.append(RunKey(test.name, "last_title"))
        row_ranks[keys[-1].label] = last_title_ranks(test, items, exclude)
    runs = {run: ndcg_hr(r, TOPK) for run, r in row_ranks.items()}
    info: dict = {"diagnostics": diagnostics(test, catalog)}
    log.info("%s: %d rows grounded in %.1fs (%.1fs embedding generations that are not titles)", test.name,
             len(test.rows), time.perf_counter() - start, embed.seconds - embedded)
    if valid is not None:  # validation's plain metrics choose between rankings (the demo's run.yaml)
        info["valid_file"] = str(valid.path)
        valid_exclude = excluded(valid, config, catalog)
        valid_dist, valid_ranks, valid_empty, valid_first = ground_results(valid, items, embed, valid_exclude,
                                                                           config.ground_beams)
        info["valid_plain"] = ndcg_hr(valid_ranks, TOPK)  # to compare with the re-weightings' validation
    for kind, per_file in weights.items():
        start = time.perf_counter()
        scores, valid_scores, sources = per_file[test.name]
        out = reweighted(dist, empty, scores, test.targets, valid_dist, valid_empty, valid_scores, valid.targets,
                         first, valid_first, exclude, valid_exclude)
        tuned = RunKey(test.name, "reweighted", kind, "each metric")
        keys += [tuned, RunKey(test.name, "reweighted", kind, "NDCG", out["single_k"])]
        single = keys[-1].label
        runs[tuned.label] = out.pop("tuned")
        runs[single] = out.pop("single")
        row_ranks[single] = out.pop("single_ranks")
        blend = out.pop("blend")
        if blend is not None:
            keys.append(RunKey(test.name, "blend", kind, "NDCG", 10))
            name = keys[-1].label
            row_ranks[name] = blend.pop("ranks")
            runs[name] = ndcg_hr(row_ranks[name], TOPK)
            out["blend"] = blend
        info[kind] = {**sources, **out}
        log.info("%s +%s: gamma searched and applied in %.1fs", test.name, kind, time.perf_counter() - start)
    if cf is not None:
        scores, valid_scores, sources = cf
        keys.append(RunKey(test.name, "likelihood_cf", "SASRec", "NDCG", 10))
        name = keys[-1].label
        row_ranks[name], choice = likelihood_cf_ranks(test, valid, scores, valid_scores, exclude, valid_exclude, items)
        runs[name] = ndcg_hr(row_ranks[name], TOPK)
        info["likelihood_cf"] = {**sources, **choice}
        log.info("%s likelihood + SASRec: weight %s, last title's %s chosen on validation (NDCG@10 %.4f; terms "
                 "kept: %s)", test.name, choice["weight"], choice["content_weight"], choice["valid_ndcg10"],
                 ", ".join(choice["terms"]))
    info["intervals"] = rank_intervals(row_ranks, other[0] if other else None)
    if other is not None:
        info["compare"] = {"scores": other[1], "ci": bootstrap_ci(other[0], TOPK),
                           "tied_targets": other[0].tied_targets()}
    info["runs"] = {key.label: key.fields() for key in keys}
    info["rows"] = [r.get("row") for r in test.rows]
    info["ranks"] = {run: r.tolist() for run, r in row_ranks.items()}  # expected ranks under random tie-breaking
    info["tied"] = {run: r.tied.tolist() for run, r in row_ranks.items()}  # per row, other items level with the target
    info["tied_targets"] = {run: r.tied_targets() for run, r in row_ranks.items()}
    return runs, info


def log_diagnostics(details: dict) -> None:
    for name, info in details["files"].items():
        d = info["diagnostics"]
        copies = d["history_copy_top1_share"]
        if d.get("certified_top10_share") is not None:
            log.info("%s: top 10 provably exact in %.1f%% of rows (elsewhere the search ran out of --search_nodes)",
                     name, 100 * d["certified_top10_share"])
        log.info("%s (%s decoding): distinct top-1 %.1f%%, exact catalogue titles %.1f%%, copies of a history title "
                 "%s, empty %d; most frequent: %s", name, d["decoding"], 100 * d["distinct_top1_share"],
                 100 * d["exact_title_top1_share"], "n/a" if copies is None else f"{100 * copies:.1f}%", d["empty_top1"],
                 ", ".join(f"{t!r} x{c}" for t, c in d["most_frequent_top1"][:3]))


def run(config: Config) -> dict:
    from bigrec.evaluation.report import format_intervals, format_table, metrics_json, plot_metrics, tied_line
    from bigrec.llm.models import load_model

    output = Path(config.output)
    details_path = output.with_name(output.stem + ".details.json")
    catalog = read_catalog(config.catalog)
    n = len(catalog)
    # every input is read and checked before the model loads
    tests = [read_results(p, catalog) for p in result_files(config.input_dir, {output, details_path})]
    weights, pairs = read_weights(config, tests, catalog)
    cf = read_cf(config, tests, pairs, n)
    others = compared_ranks(config, tests, catalog)
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
                     "catalog": str(catalog.path), "num_items": n, "all_beams": config.all_beams,
                     "ground_beams": config.ground_beams, "exclude_history": config.exclude_history, "files": {}}
    for test in tests:
        file_runs, details["files"][test.name] = evaluate_file(test, config, catalog, items, embed, weights,
                                                               pairs.get(test.name), others.get(test.name),
                                                               cf.get(test.name))
        runs.update(file_runs)

    metrics = metrics_json(runs, TOPK)
    io.write_json(output, metrics)
    io.write_json(details_path, details)
    plot_metrics(metrics, output.with_suffix(".png"), TOPK)
    io.write_yaml(output.with_name(output.stem + ".config.yaml"), to_dict(config))
    if config.report:
        write_evaluation_report(output, metrics, details)
    sys.stdout.write(format_table(metrics, TOPK) + "\n")
    for info in details["files"].values():
        against = Path(info["compare"]["scores"]).name if "compare" in info else None
        sys.stdout.write("\n" + format_intervals(metrics, info["intervals"], TOPK, (10,), against) + "\n")
        sys.stdout.write(tied_line(info["tied_targets"], len(info["rows"])) + "\n")
    log_diagnostics(details)
    return metrics
