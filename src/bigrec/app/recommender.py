"""A finished run folder loaded once, recommending for batches of histories.

``bigrec recommend`` and ``bigrec serve`` share this core. :meth:`Recommender.from_run` reads
``run.yaml`` (:class:`bigrec.app.run_manifest.RunManifest`) and loads, once: the base model alone
(embeddings, as the item index was made) and with the adapter merged (generation; the two
share every weight the adapter does not change, :func:`bigrec.llm.models.with_merged_adapter`),
the catalogue, the item index (checked against the base model's fingerprint, the catalogue and
the precision by :func:`bigrec.grounding.index.ensure_index`) and SASRec where the run has one.

One :meth:`Recommender.recommend_queries` call runs the two BIGRec steps for a whole batch:

1. history items (catalogue ids, or titles) become catalogue items. A title that is not in
   the catalogue, even ignoring case, is matched to the nearest catalogue title by L2 distance
   between base-model embeddings, the same measure that grounds generations; the match is
   reported with its distance;
2. the instruction prompt (``bigrec.data.prompts``, the run's domain wording, the last
   ``max_history`` items) goes through beam search with the run's ``num_beams``, in one
   ``generate`` call for the batch;
3. the top generation (normalised like a catalogue title) is embedded and every item is ranked
   by L2 distance; with ``use_ci`` the distances are re-weighted by SASRec's scores for the
   same history, ``minmax(d) * (1 + minmax(s)) ** (-ci_gamma)`` (``bigrec.grounding.reweighting.reweight``).

A lower score is better in both cases.

A run whose ``run.yaml`` says ``decoding: likelihood`` skips steps 2 and 3: every catalogue title
is scored by its log-probability given the prompt (:mod:`bigrec.llm.likelihood`, the run's
``search_nodes``), minus ``prior_weight`` times its no-history log-probability, and the items come
in that order, scored by the negative of it; nothing is generated or grounded, so there are no
distances. CI there is likelihood + SASRec (:mod:`bigrec.grounding.likelihood_cf`, where run.yaml has a
``likelihood_cf_weight``): the run's top ``candidates`` titles by likelihood and SASRec's top
``candidates`` titles for the same history (scored exactly), each item by ``log p + w * minmax(s)``,
every other item below them by SASRec's score, as ``bigrec evaluate --cf_scores`` ranks them. The run's ``layout`` writes the prompts (and the titles the model is scored
on) as the model was trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bigrec.app.run_manifest import RunManifest
from bigrec.data.catalog import Catalog, read_catalog
from bigrec.data.prompts import Domain, natural_title, normalize_title
from bigrec.grounding.ranking import l2_distances
from bigrec.grounding.reweighting import blend, reweight
from bigrec.io import InputError, read_json
from bigrec.llm.layouts import get_layout
from bigrec.llm.models import resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 10  # bigrec prepare's default when the data folder does not say


class HistoryError(InputError):
    """A history (or, with ``index``, one of its items) that cannot be used."""

    def __init__(self, message: str, index: int | None = None):
        self.index = index
        self.field = "history" if index is None else f"history[{index}]"
        self.reason = message
        super().__init__(f"{self.field}: {message}")


@dataclass(frozen=True)
class Match:
    """A history item as given, and the catalogue item it became."""

    given: str | int
    id: int
    title: str
    how: str  # "id", "title" (exact after normalisation), "case" (ignoring case), "nearest" (embedding)
    distance: float | None = None  # L2 between the embeddings of the given and the matched title ("nearest")


@dataclass(frozen=True)
class Item:
    id: int
    title: str
    score: float  # what the ranking sorts by, lower is better: L2 distance, re-weighted with use_ci, or -log p
    distance: float | None  # L2 distance between the grounded text's and the title's embeddings (None: likelihood)


@dataclass(frozen=True)
class Scored:
    """An item of a conventional model's ranking: higher scores are better."""

    id: int
    title: str
    score: float


@dataclass
class Query:
    history: list[str | int]  # oldest first; catalogue ids (int) or titles (str)
    k: int = 10
    use_ci: bool | None = None  # None: the run's default (run.yaml use_ci, chosen on validation)
    exclude_history: bool | None = None  # drop history items (and ids sharing their titles); None: the run's default
    baselines: bool = False  # also SASRec's and popularity's top k for the same history


@dataclass
class Result:
    history: list[Match]
    generated: list[str]  # every beam, best first, cut at the end of its title (empty: likelihood ranking)
    grounded: str  # the text whose embedding ranked the items (the top beam, normalised; empty: likelihood)
    items: list[Item]
    use_ci: bool = False
    ranking: str = ""  # which ranking this is, and why (the run's validated default or the caller's choice)
    baselines: dict[str, list[Scored]] | None = None  # "sasrec", "popularity" -> top k (with Query.baselines)
    timing: dict[str, float] = field(default_factory=dict)
    decoding: str = "free"  # free (generated, then grounded) or likelihood (every title scored; nothing generated)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_model_path(run_dir: Path, base_model: str) -> str:
    """``base_model`` relative to the run folder when such a folder is there, else as written."""
    local = run_dir / base_model
    return str(local.resolve()) if local.is_dir() else base_model


def _max_history(data_dir: Path | None) -> int:
    config = data_dir / "config.yaml" if data_dir is not None else None
    if config is not None and config.is_file():
        value = (yaml.safe_load(config.read_text()) or {}).get("max_history")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_HISTORY


class Recommender:
    """Everything a run folder needs to recommend, loaded once; not thread-safe (one worker)."""

    def __init__(self, run_dir: Path, manifest: RunManifest, catalog: Catalog, items: torch.Tensor,
                 gen_model, embed_model, tokenizer, sasrec=None, max_history: int = DEFAULT_MAX_HISTORY):
        self.run_dir = run_dir
        self.manifest = manifest
        self.catalog = catalog
        self.items = items  # [N, D] float32 item embeddings, row = catalogue id
        self.gen_model = gen_model
        self.embed_model = embed_model
        self.tokenizer = tokenizer
        self.sasrec = sasrec
        # the prompt encoding's dtype (bf16 under autocast on a CPU with bf16, the weights held once)
        self.prefill_dtype = resolve_dtype(manifest.precision, gen_model.device, "prefill")
        self.max_history = max_history
        try:
            self.domain: Domain = manifest.wording()  # as bigrec prepare worded the training rows
        except ValueError as exc:
            raise InputError(f"{run_dir}/{exc}") from None
        self.layout = get_layout(manifest.layout, manifest.prompt_template, self.domain.plural)
        self.scorer = None
        if manifest.decoding == "likelihood":
            from bigrec.llm.likelihood import TitleScorer

            self.scorer = TitleScorer(gen_model, tokenizer, self.layout.trie(tokenizer, catalog.titles),
                                      autocast=self.prefill_dtype)
        self._casefold: dict[str, int] = {}
        for item_id, title in enumerate(catalog.titles):
            self._casefold.setdefault(title.casefold(), item_id)
        self._search_keys = [title.casefold() for title in catalog.titles]
        self._popularity: torch.Tensor | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None) -> Recommender:
        from bigrec.baselines.sasrec import SASRec
        from bigrec.grounding.index import ensure_index
        from bigrec.grounding.options import grounding_of
        from bigrec.llm.models import load_model, with_merged_adapter

        run_dir = Path(run_dir).resolve()
        manifest = RunManifest.load(run_dir)
        start = time.perf_counter()
        base = _resolve_model_path(run_dir, manifest.base_model)
        catalog_path = manifest.path(run_dir, "catalog")
        catalog = read_catalog(catalog_path)
        embed_model, tokenizer = load_model(base, manifest.precision, device=device)
        adapter = manifest.path(run_dir, "adapter")
        if manifest.decoding == "likelihood" and \
                resolve_dtype(manifest.precision, embed_model.device, "prefill") != embed_model.dtype:
            # Loaded as `bigrec generate --decoding likelihood` loads it (weights in the prefill's dtype,
            # bf16 where native), so the served ranking is the evaluated one, near ties included.
            gen_model = load_model(base, manifest.precision, str(adapter) if adapter is not None else None,
                                   device=str(embed_model.device), phase="prefill")[0]
        else:
            # decode and embedding compute in one dtype (resolve_dtype), so generation shares every
            # weight the adapter leaves alone with the embedding model
            gen_model = with_merged_adapter(embed_model, adapter) if adapter is not None else embed_model
        items = ensure_index(base, catalog_path, manifest.path(run_dir, "index"), manifest.precision,
                             model=embed_model, tokenizer=tokenizer, grounding=grounding_of(manifest))
        sasrec = None
        sasrec_dir = manifest.path(run_dir, "sasrec")
        if sasrec_dir is not None:
            sasrec = SASRec.from_dir(sasrec_dir, device=embed_model.device)
            _check_sasrec(sasrec_dir, sasrec, catalog)
        log.info("loaded run %s in %.1fs: %d items, adapter %s, SASRec %s", run_dir, time.perf_counter() - start,
                 len(catalog), "yes" if adapter else "no", "yes" if sasrec else "no")
        return cls(run_dir, manifest, catalog, items, gen_model, embed_model, tokenizer, sasrec,
                   _max_history(manifest.path(run_dir, "data")))

    # --- history items ---------------------------------------------------------------------

    def check_history(self, history: list[str | int]) -> None:
        """Raise :class:`HistoryError` for what no model work can fix: empty, unknown ids, blank titles."""
        if not history:
            raise HistoryError("the history is empty; give at least one catalogue id or title")
        n = len(self.catalog)
        for where, item in enumerate(history):
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise HistoryError(f"expected a catalogue id (integer) or a title (string), got {item!r}", where)
            if isinstance(item, int) and not 0 <= item < n:
                raise HistoryError(f"item id {item} is not in the catalogue (ids 0..{n - 1})", where)
            if isinstance(item, str) and not normalize_title(item):
                raise HistoryError("empty title", where)
            if isinstance(item, str) and not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:  # a lone surrogate: JSON "\ud800", or argv bytes that are not UTF-8
                    raise HistoryError("title is not valid Unicode text (a lone surrogate; bytes that are not "
                                       "UTF-8?)", where) from None

    def match(self, histories: list[list[str | int]]) -> list[list[Match]]:
        """Catalogue items for the history items of every history; unknown titles by embedding."""
        for history in histories:
            self.check_history(history)
        out: list[list[Match | None]] = []
        pending: dict[str, list[tuple[int, int]]] = {}  # normalised title -> positions to fill
        for h, history in enumerate(histories):
            row: list[Match | None] = []
            for i, item in enumerate(history):
                if isinstance(item, int):
                    row.append(Match(item, item, self.catalog.titles[item], "id"))
                    continue
                title = normalize_title(item)
                ids = self.catalog.ids_for(title)
                if ids:
                    row.append(Match(item, ids[0], self.catalog.titles[ids[0]], "title"))
                elif title.casefold() in self._casefold:
                    found = self._casefold[title.casefold()]
                    row.append(Match(item, found, self.catalog.titles[found], "case"))
                else:
                    row.append(None)
                    pending.setdefault(title, []).append((h, i))
            out.append(row)
        if pending:
            texts = list(pending)
            dist = l2_distances(self._embed(texts), self.items)  # [U, N]
            best = dist.min(dim=1)
            for text, d, found in zip(texts, best.values.tolist(), best.indices.tolist(), strict=True):
                for h, i in pending[text]:
                    out[h][i] = Match(histories[h][i], found, self.catalog.titles[found], "nearest", d)
        return out  # type: ignore[return-value]

    def search(self, query: str, limit: int = 20) -> list[tuple[int, str]]:
        """Catalogue items whose title contains ``query`` (ignoring case); titles starting with it first."""
        key = " ".join(query.split()).casefold()
        if not key:
            return []
        hits = [i for i, title in enumerate(self._search_keys) if key in title]
        hits.sort(key=lambda i: (not self._search_keys[i].startswith(key), i))
        return [(i, self.catalog.titles[i]) for i in hits[:limit]]

    # --- the two steps -----------------------------------------------------------------------

    def _row(self, titles: list[str]) -> dict[str, str]:
        if self.manifest.prompt_titles == "natural":  # as the model was trained (bigrec prepare --prompt_titles)
            titles = [natural_title(t) for t in titles]
        return self.layout.row(self.domain, titles[-self.max_history:], "")

    def prompt(self, titles: list[str]) -> str:
        """The prompt for a history of catalogue titles, as the run's layout wrote it in training."""
        return self.layout.prompt(self._row(titles))

    def _embed(self, texts: list[str]) -> torch.Tensor:
        from bigrec.grounding.embedding import embed_texts
        from bigrec.grounding.options import grounding_of

        return embed_texts(self.embed_model, self.tokenizer, texts, grounding=grounding_of(self.manifest))

    def recommend(self, histories: list[list[str | int]], k: int = 10, use_ci: bool | None = None,
                  exclude_history: bool | None = None) -> list[Result]:
        """Top-``k`` catalogue items for each history (oldest item first)."""
        return self.recommend_queries([Query(list(h), k, use_ci, exclude_history) for h in histories])

    def recommend_queries(self, queries: list[Query]) -> list[Result]:
        """One generation call and one ranking pass for a batch of queries, each with its own k and options."""
        if not queries:
            return []
        for q in queries:
            if q.k < 1:
                raise InputError(f"k must be at least 1, got {q.k}")
        if any(q.use_ci for q in queries):
            self._check_ci()
        use_ci = [self.default_ci if q.use_ci is None else q.use_ci for q in queries]
        t0 = time.perf_counter()
        matches = self.match([q.history for q in queries])
        exclude = [self.manifest.exclude_history if q.exclude_history is None else q.exclude_history
                   for q in queries]
        t1 = time.perf_counter()
        rank = self._rank_by_likelihood if self.scorer is not None else self._generate_and_ground
        results = rank(queries, matches, use_ci, exclude)
        t2 = time.perf_counter()
        wanted = [r for r, q in enumerate(queries) if q.baselines]
        if wanted:
            lists = self.baseline_lists([[m.id for m in matches[r]] for r in wanted], [queries[r] for r in wanted])
            for r, found in zip(wanted, lists, strict=True):
                results[r].baselines = found
        timing = {"match_s": t1 - t0, "rank_s": t2 - t1, "baselines_s": time.perf_counter() - t2,
                  "batch": len(queries)}
        for result in results:
            result.timing = dict(timing)
        return results

    def _generate_and_ground(self, queries: list[Query], matches: list[list[Match]], use_ci: list[bool],
                             exclude: list[bool]) -> list[Result]:
        """The paper's two steps for the batch: one beam-search call, then every item by L2 distance."""
        from bigrec.llm.generation import generate_batch

        prompts = [self.prompt([m.title for m in row]) for row in matches]
        beams = generate_batch(self.gen_model, self.tokenizer, prompts, self.manifest.num_beams,
                               self.manifest.max_new_tokens, prefill_dtype=self.prefill_dtype,
                               stop_token_id=self.layout.stop_token(self.tokenizer))
        grounded = [_grounding_text(b, row) for b, row in zip(beams, matches, strict=True)]
        dist = l2_distances(self._embed(grounded), self.items)  # [B, N]
        score = dist.clone()
        ci_rows = [r for r, use in enumerate(use_ci) if use]
        if ci_rows:
            sasrec_scores = self.sasrec.score([[m.id for m in matches[r]] for r in ci_rows]).float().cpu()
            weight = self.manifest.ci_blend_weight
            score[ci_rows] = (reweight(dist[ci_rows], sasrec_scores, float(self.manifest.ci_gamma)) if weight is None
                              else blend(dist[ci_rows], sasrec_scores, float(weight)))
        results = []
        for r, q in enumerate(queries):
            row = score[r]
            if exclude[r]:
                row = row.clone()
                row[self.seen_ids([m.id for m in matches[r]])] = float("inf")
            order = torch.argsort(row, stable=True)[: q.k].tolist()  # ties: lower id first
            items = [Item(i, self.catalog.titles[i], float(row[i]), float(dist[r, i])) for i in order
                     if row[i] != float("inf")]
            results.append(Result(matches[r], beams[r], grounded[r], items, use_ci[r],
                                  self.ranking_label(use_ci[r], q.use_ci is None)))
        return results

    def _rank_by_likelihood(self, queries: list[Query], matches: list[list[Match]], use_ci: list[bool],
                            exclude: list[bool]) -> list[Result]:
        """Every title by its log-probability given the prompt (minus the run's prior), best first.

        Queries asking for the same k are searched together, so an answer does not depend on what
        else shared its batch (past ``search_nodes`` the places beyond a row's exact top depend on k)."""
        scorer, trie, m = self.scorer, self.scorer.trie, self.manifest
        rows = [self._row([x.title for x in row]) for row in matches]
        prompts = [self.layout.prompt(row) for row in rows]
        prior = None
        if m.prior_weight:
            prior = [m.prior_weight * scorer.prior(self.layout.empty_history_prompt(row)) for row in rows]
        excluded = [trie.leaves_of([x.id for x in matches[r]]) if exclude[r] else [] for r in range(len(queries))]
        rankings: list = [None] * len(queries)
        blended = [r for r in range(len(queries)) if use_ci[r]]
        for k in sorted({q.k for r, q in enumerate(queries) if not use_ci[r]}):
            group = [r for r, q in enumerate(queries) if q.k == k and not use_ci[r]]
            found = scorer.rank([prompts[r] for r in group], k, None if prior is None else [prior[r] for r in group],
                                [excluded[r] for r in group], max_nodes=m.search_nodes)
            for r, ranking in zip(group, found, strict=True):
                rankings[r] = ranking
        items = self._blend_with_sasrec(queries, blended, matches, prompts, prior, excluded, exclude) if blended else {}
        results = []
        for r, q in enumerate(queries):
            if r not in items:
                items[r] = [Item(i, self.catalog.titles[i], -score, None)
                            for leaf, score in zip(rankings[r].leaves, rankings[r].scores, strict=True)
                            for i in trie.leaf_items[leaf]][: q.k]
            results.append(Result(matches[r], [], "", items[r], use_ci[r],
                                  self.ranking_label(use_ci[r], q.use_ci is None), decoding="likelihood"))
        return results

    def _blend_with_sasrec(self, queries: list[Query], rows: list[int], matches: list[list[Match]],
                           prompts: list[str], prior: list[torch.Tensor] | None, excluded: list[list[int]],
                           exclude: list[bool]) -> dict[int, list[Item]]:
        """Likelihood + SASRec for ``rows`` of the batch, as generate and evaluate rank it: the top
        ``candidates`` titles by likelihood (searched together, whatever each query's k) and SASRec's,
        scored exactly, in the same rounding as a result file."""
        from bigrec.grounding.likelihood_cf import merge, top_items
        from bigrec.llm.decoders import cf_leaves

        scorer, trie, m = self.scorer, self.scorer.trie, self.manifest
        found = scorer.rank([prompts[r] for r in rows], m.candidates,
                            None if prior is None else [prior[r] for r in rows], [excluded[r] for r in rows],
                            max_nodes=m.search_nodes)
        sasrec = self.sasrec.score([[x.id for x in matches[r]] for r in rows]).float().cpu()
        out = {}
        for j, (r, ranking) in enumerate(zip(rows, found, strict=True)):
            leaves = cf_leaves(trie, sasrec[j], m.candidates, excluded[r])
            logp = scorer.exact([prompts[r]], torch.tensor(leaves))[0] if leaves else torch.zeros(0)
            if prior is not None and leaves:
                logp = logp - prior[r][leaves]
            candidates = merge([trie.leaf_items[leaf] for leaf in ranking.leaves],
                               [round(v, 6) for v in ranking.scores], [trie.leaf_items[leaf] for leaf in leaves],
                               [round(float(v), 6) for v in logp])
            seen = self.seen_ids([x.id for x in matches[r]]) if exclude[r] else []
            out[r] = [Item(i, self.catalog.titles[i], -score, None)
                      for i, score in top_items(candidates, sasrec[j], float(m.likelihood_cf_weight), queries[r].k,
                                                seen)]
        return out

    def seen_ids(self, history: list[int]) -> list[int]:
        """Every catalogue id sharing a title with a history item (what exclude_history leaves out)."""
        return sorted({i for m in history for i in self.catalog.ids_for(self.catalog.titles[m])})

    @property
    def popularity(self) -> torch.Tensor | None:
        """Training counts [N] from the run's prepared data (None without it), read once."""
        data = self.manifest.path(self.run_dir, "data")
        if self._popularity is None and data is not None and (data / "train.csv").is_file():
            from bigrec.baselines.popularity import train_counts

            self._popularity = train_counts(data, len(self.catalog)).float()
        return self._popularity

    def baseline_lists(self, histories: list[list[int]], queries: list[Query]) -> list[dict[str, list[Scored]]]:
        """SASRec's and popularity's top k for each history (ids), as the run's baselines rank them."""
        sasrec = self.sasrec.score(histories).float().cpu() if self.sasrec is not None else None
        pop = self.popularity
        out = []
        for r, (history, q) in enumerate(zip(histories, queries, strict=True)):
            found: dict[str, list[Scored]] = {}
            for name, scores in (("sasrec", None if sasrec is None else sasrec[r]), ("popularity", pop)):
                if scores is None:
                    continue
                scores = scores.clone()
                if q.exclude_history:
                    scores[self.seen_ids(history)] = float("-inf")
                top = torch.argsort(-scores, stable=True)[: q.k].tolist()
                found[name] = [Scored(i, self.catalog.titles[i], float(scores[i])) for i in top
                               if scores[i] != float("-inf")]
            out.append(found)
        return out

    @property
    def ci_unavailable(self) -> str | None:
        """Why this run cannot re-weight by SASRec (None when it can): one wording for the
        Python API's error and the service's 422, which names no server path."""
        if self.scorer is not None and self.manifest.likelihood_cf_weight is None:
            return ("this run ranks by likelihood and has no likelihood_cf_weight in run.yaml (chosen on validation "
                    "by bigrec evaluate --cf_scores) to blend SASRec's scores with")
        if self.sasrec is None:
            return "this run has no SASRec model to re-weight with (run.yaml: sasrec is unset)"
        if self.scorer is None and self.manifest.ci_gamma is None:
            return "this run has no ci_gamma in run.yaml (chosen on validation by bigrec evaluate)"
        return None

    def _check_ci(self) -> None:
        if self.ci_unavailable:
            raise InputError(f"use_ci: {self.ci_unavailable} ({self.run_dir})")

    @property
    def has_ci(self) -> bool:
        return self.ci_unavailable is None

    @property
    def default_ci(self) -> bool:
        """Re-weight by SASRec unless asked otherwise: where the run chose it on validation and can."""
        return bool(self.manifest.use_ci) and self.has_ci

    def ranking_label(self, use_ci: bool, by_default: bool) -> str:
        if self.scorer is not None:
            m = self.manifest
            prior = f", minus {m.prior_weight} x its no-history log-probability" if m.prior_weight else ""
            name = f"BIGRec (likelihood: every title by its log-probability given the history{prior})"
            if use_ci:
                name += (f" + SASRec (log-probability + {m.likelihood_cf_weight} x SASRec's min-max score over both "
                         f"models' top {m.candidates} titles; the rest by SASRec)")
            if not by_default:
                return f"{name}, as asked"
            return name + (f", the run's ranking: {m.ranking_note}" if m.ranking_note else "")
        how = ("re-weighted by SASRec's scores" if self.manifest.ci_blend_weight is None
               else f"blended with SASRec's scores, weight {self.manifest.ci_blend_weight}")
        name = f"BIGRec + CI (distances {how})" if use_ci else "BIGRec (L2 distance to the generated title)"
        if not by_default:
            return f"{name}, as asked"
        return f"{name}, the run's default" + (f": {self.manifest.ranking_note}" if self.manifest.ranking_note else "")

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        stats = self.manifest.path(self.run_dir, "data")
        stats = stats / "stats.json" if stats is not None else None
        dataset = read_json(stats).get("dataset") if stats is not None and stats.is_file() else None
        return {"run": str(self.run_dir), "base_model": m.base_model, "adapter": m.adapter, "items": len(self.catalog),
                "dataset": dataset, "sasrec_available": self.sasrec is not None,
                "popularity_available": self.popularity is not None,
                "decoding": m.decoding, "layout": m.layout, "prior_weight": m.prior_weight,
                "search_nodes": m.search_nodes, "exclude_history_by_default": m.exclude_history,
                "likelihood_cf_weight": m.likelihood_cf_weight,
                "domain": m.domain, "num_beams": m.num_beams, "max_new_tokens": m.max_new_tokens,
                "max_history": self.max_history, "ci_available": self.has_ci, "ci_gamma": m.ci_gamma,
                "ci_by_default": self.default_ci, "ranking_note": m.ranking_note,
                "device": str(self.gen_model.device), "dtype": str(self.gen_model.dtype).removeprefix("torch.")}


def _grounding_text(beams: list[str], history: list[Match]) -> str:
    """The best non-empty beam, normalised like a title; the last history title if all are empty."""
    for text in beams:
        title = normalize_title(text)
        if title:
            return title
    log.warning("every beam was empty; grounding on the last history title instead")
    return history[-1].title


def _check_sasrec(path: Path, model, catalog: Catalog) -> None:
    meta = read_json(path / "model.json")
    digest = meta.get("catalog_digest")
    if model.config.num_items != len(catalog) or (digest and digest != catalog.digest):
        raise InputError(f"{path}: SASRec was trained on another catalogue ({model.config.num_items} items) "
                         f"than {catalog.path} ({len(catalog)} items)")
