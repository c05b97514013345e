"""A finished run folder loaded once, recommending for batches of histories.

``bigrec recommend`` and ``bigrec serve`` share this core. :meth:`Recommender.from_run` reads
``run.yaml`` (:class:`bigrec.app.run_manifest.RunManifest`) and loads, once: the base model alone
(embeddings, as the item index was made) and with the adapter merged (generation; the two
share every weight the adapter does not change, :func:`bigrec.llm.models.with_merged_adapter`),
the catalogue, the item index (checked against the base model's fingerprint, the catalogue and
the precision by :func:`bigrec.grounding.index.ensure_index`) and SASRec where the run has one.

One :meth:`Recommender.recommend_queries` call answers a whole batch, through the decoders of
``bigrec generate`` (:func:`bigrec.llm.decoders.make_decoder`, configured from ``run.yaml`` by
:meth:`bigrec.app.run_manifest.RunManifest.decoding`), so a request is ranked as ``generate`` +
``evaluate`` rank the same row:

1. history items (catalogue ids, or titles) become catalogue items. A title that is not in
   the catalogue, even ignoring case, is matched to the nearest catalogue title by L2 distance
   between base-model embeddings, the same measure that grounds generations; the match is
   reported with its distance;
2. the prompt (the run's layout and domain wording, the last ``max_history`` items) goes to the
   run's decoding in one call for the batch: ``free`` beam search, ``constrained`` beam search over
   the catalogue's titles, or ``likelihood`` (the run's top ``candidates`` titles by log-probability,
   minus ``prior_weight`` times the no-history one); a request that leaves its history out asks
   the decoder to (:class:`bigrec.llm.decoders.Ask`);
3. every item is ranked by the L2 distance of its embedding to the top title (the best non-empty
   beam, normalised); the decoder's own items (constrained beams, likelihood candidates) come
   first, in its order (:func:`bigrec.grounding.ranking.rank_with_beams`, as ``bigrec evaluate``).
   With ``use_ci`` a free or constrained run re-weights the distances by SASRec's scores for the
   same history, ``minmax(d) * (1 + minmax(s)) ** (-ci_gamma)`` (or the blend, ``ci_blend_weight``),
   and a likelihood run ranks likelihood + SASRec (:mod:`bigrec.grounding.likelihood_cf`): both models'
   top ``candidates`` titles, each item by ``log p + w * minmax(s)`` (``likelihood_cf_weight``; plus
   ``likelihood_content_weight`` times its min-max closeness to the last history title where validation
   kept that term), every other item below them by SASRec's score, as ``bigrec evaluate --cf_scores`` does.

Lower scores are better.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigrec.app.run_manifest import RunManifest
from bigrec.data.catalog import Catalog, read_catalog
from bigrec.data.prompts import Domain, natural_title, normalize_title
from bigrec.grounding.ranking import l2_distances, rank_with_beams
from bigrec.grounding.reweighting import blend, reweight
from bigrec.io import InputError, read_json, read_yaml_mapping
from bigrec.llm.decoders import Ask, layout_of, make_decoder
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
    # lower is better: -log p of a likelihood candidate (with use_ci, minus the blend), -score of a constrained
    # beam; else the L2 distance (re-weighted with use_ci). The decoder's own items rank before the rest.
    score: float
    distance: float | None  # L2 distance between the grounded text's and the title's embeddings (None: not computed)


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
    exclude_history: bool | None = None  # leave the history's titles out (Catalog.history_titles); None: the run's
    baselines: bool = False  # also SASRec's and popularity's top k for the same history


@dataclass
class Result:
    history: list[Match]
    generated: list[str]  # every beam (free, constrained) or candidate title (likelihood), best first
    grounded: str  # the text whose embedding ranked the items past the decoder's own (the top title, normalised)
    items: list[Item]
    use_ci: bool = False
    ranking: str = ""  # which ranking this is, and why (the run's validated default or the caller's choice)
    baselines: dict[str, list[Scored]] | None = None  # "sasrec", "popularity" -> top k (with Query.baselines)
    timing: dict[str, float] = field(default_factory=dict)
    decoding: str = "free"  # the run's decoding (bigrec.llm.decoders.DECODINGS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resolve_model_path(run_dir: Path, base_model: str) -> str:
    """``base_model`` relative to the run folder when such a folder is there, else as written."""
    local = run_dir / base_model
    return str(local.resolve()) if local.is_dir() else base_model


def _max_history(data_dir: Path | None) -> int:
    config = data_dir / "config.yaml" if data_dir is not None else None
    if config is not None and config.is_file():
        value = read_yaml_mapping(config).get("max_history")
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
        self.decoding = manifest.decoding_config(run_dir, sasrec is not None)
        self.layout = layout_of(self.decoding)
        self._sasrec_scores = _LiveScores(sasrec, len(catalog)) if sasrec is not None else None
        self.decoder = make_decoder(self.decoding, gen_model, tokenizer, self.prefill_dtype,
                                    self._sasrec_scores if self.decoding.cf_scores else None)
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
        if manifest.decoding != "free" and \
                resolve_dtype(manifest.precision, embed_model.device, "prefill") != embed_model.dtype:
            # Loaded as `bigrec generate` loads it for a decoding that scores titles (weights in the
            # prefill's dtype, bf16 where native), so the served ranking is the evaluated one, near ties included.
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
        results = self._rank(queries, matches, use_ci, exclude)
        t2 = time.perf_counter()
        wanted = [r for r, q in enumerate(queries) if q.baselines]
        if wanted:
            lists = self.baseline_lists([[m.id for m in matches[r]] for r in wanted], [queries[r].k for r in wanted],
                                        [exclude[r] for r in wanted])
            for r, found in zip(wanted, lists, strict=True):
                results[r].baselines = found
        timing = {"match_s": t1 - t0, "rank_s": t2 - t1, "baselines_s": time.perf_counter() - t2,
                  "batch": len(queries)}
        for result in results:
            result.timing = dict(timing)
        return results

    def rows(self, matches: list[list[Match]]) -> list[dict]:
        """The rows the decoders read for these histories: the prepared row's text fields, as the
        run's layout wrote them in training, and the history's ids."""
        return [{**self._row([m.title for m in row]), "history_item_id": [m.id for m in row]} for row in matches]

    def _rank(self, queries: list[Query], matches: list[list[Match]], use_ci: list[bool],
              exclude: list[bool]) -> list[Result]:
        """The run's decoding for the batch in one call, then every item ranked as evaluate ranks it."""
        from bigrec.grounding.likelihood_cf import last_title_content, merge, top_items

        m, likelihood = self.manifest, self.decoding.decoding == "likelihood"
        rows = self.rows(matches)
        out = self.decoder(rows, [self.layout.prompt(r) for r in rows],
                           [Ask(x, cf=c) for x, c in zip(exclude, use_ci, strict=True)])
        grounded = [_grounding_text(o["predict"], row) for o, row in zip(out, matches, strict=True)]
        dist = l2_distances(self._embed(grounded), self.items)  # [B, N]
        score = dist.clone()
        ci_rows = [r for r, use in enumerate(use_ci) if use]
        sasrec = None
        if ci_rows:
            sasrec = self._sasrec_scores.score([rows[r]["history_item_id"] for r in ci_rows])
            if not likelihood:
                weight = m.ci_blend_weight
                score[ci_rows] = (reweight(dist[ci_rows], sasrec, float(m.ci_gamma)) if weight is None
                                  else blend(dist[ci_rows], sasrec, float(weight)))
        results = []
        for r, q in enumerate(queries):
            seen = self.catalog.history_titles(rows[r]["history_item_id"]) if exclude[r] else []
            own: dict[int, float] = {}  # the decoder's items, best first -> their score (lower is better)
            if likelihood and use_ci[r]:
                candidates = merge(out[r]["predict_ids"], out[r]["predict_scores"], out[r]["cf_ids"],
                                   out[r]["cf_logp"])
                content = (last_title_content([rows[r]["history_item_id"]], self.items)[0]
                           if m.likelihood_content_weight else None)
                own = {i: -v for i, v in top_items(candidates, sasrec[ci_rows.index(r)], float(m.likelihood_cf_weight),
                                                   q.k, seen, content, float(m.likelihood_content_weight))}
                order = list(own)
            else:
                for ids, value in zip(out[r].get("predict_ids", []), out[r].get("predict_scores", []), strict=True):
                    for i in ids:
                        own.setdefault(i, -value)
                row = rank_with_beams([list(own)], score[r : r + 1])[0]
                row[seen] = float("inf")
                order = [i for i in torch.argsort(row, stable=True)[: q.k].tolist()  # ties: lower id first
                         if row[i] != float("inf")]
            items = [Item(i, self.catalog.titles[i], own.get(i, float(score[r, i])), float(dist[r, i]))
                     for i in order]
            generated = [t for t in out[r]["predict"] if t]
            results.append(Result(matches[r], generated, grounded[r], items, use_ci[r],
                                  self.ranking_label(use_ci[r], q.use_ci is None), decoding=m.decoding))
        return results

    @property
    def popularity(self) -> torch.Tensor | None:
        """Training counts [N] from the run's prepared data (None without it), read once."""
        data = self.manifest.path(self.run_dir, "data")
        if self._popularity is None and data is not None and (data / "train.csv").is_file():
            from bigrec.baselines.popularity import train_counts

            self._popularity = train_counts(data, len(self.catalog)).float()
        return self._popularity

    def baseline_lists(self, histories: list[list[int]], ks: list[int],
                       exclude: list[bool]) -> list[dict[str, list[Scored]]]:
        """SASRec's and popularity's top k for each history (ids), as the run's baselines rank them,
        each history's titles left out where its query leaves them out of the model's list."""
        sasrec = self._sasrec_scores.score(histories) if self._sasrec_scores is not None else None
        pop = self.popularity
        out = []
        for r, (history, k, leave_out) in enumerate(zip(histories, ks, exclude, strict=True)):
            found: dict[str, list[Scored]] = {}
            for name, scores in (("sasrec", None if sasrec is None else sasrec[r]), ("popularity", pop)):
                if scores is None:
                    continue
                scores = scores.clone()
                if leave_out:
                    scores[self.catalog.history_titles(history)] = float("-inf")
                top = torch.argsort(-scores, stable=True)[:k].tolist()
                found[name] = [Scored(i, self.catalog.titles[i], float(scores[i])) for i in top
                               if scores[i] != float("-inf")]
            out.append(found)
        return out

    @property
    def ci_unavailable(self) -> str | None:
        """Why this run cannot re-weight by SASRec (None when it can): one wording for the
        Python API's error and the service's 422, which names no server path."""
        likelihood = self.manifest.decoding == "likelihood"
        if likelihood and self.manifest.likelihood_cf_weight is None:
            return ("this run ranks by likelihood and has no likelihood_cf_weight in run.yaml (chosen on validation "
                    "by bigrec evaluate --cf_scores) to blend SASRec's scores with")
        if self.sasrec is None:
            return "this run has no SASRec model to re-weight with (run.yaml: sasrec is unset)"
        if not likelihood and self.manifest.ci_gamma is None and self.manifest.ci_blend_weight is None:
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
        m = self.manifest
        if m.decoding == "likelihood":
            prior = f", minus {m.prior_weight} x its no-history log-probability" if m.prior_weight else ""
            name = f"BIGRec (likelihood: every title by its log-probability given the history{prior})"
            if use_ci:
                content = (f" + {m.likelihood_content_weight} x the min-max closeness to the last history title"
                           if m.likelihood_content_weight else "")
                name += (f" + SASRec (log-probability + {m.likelihood_cf_weight} x SASRec's min-max score{content} over "
                         f"both models' top {m.candidates} titles; the rest by SASRec)")
            if not by_default:
                return f"{name}, as asked"
            return name + (f", the run's ranking: {m.ranking_note}" if m.ranking_note else "")
        how = ("re-weighted by SASRec's scores" if m.ci_blend_weight is None
               else f"blended with SASRec's scores, weight {m.ci_blend_weight}")
        if m.decoding == "constrained":
            name = (f"BIGRec (constrained: {m.num_beams} beams over the catalogue's titles, then the rest by L2 "
                    "distance to the top beam)") + (f" + CI (the rest's distances {how})" if use_ci else "")
        else:
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
                "search_nodes": m.search_nodes, "candidates": m.candidates,
                "exclude_history_by_default": m.exclude_history,
                "likelihood_cf_weight": m.likelihood_cf_weight, "likelihood_content_weight": m.likelihood_content_weight,
                "domain": m.domain, "num_beams": m.num_beams, "max_new_tokens": m.max_new_tokens,
                "max_history": self.max_history, "ci_available": self.has_ci, "ci_gamma": m.ci_gamma,
                "ci_by_default": self.default_ci, "ranking_note": m.ranking_note,
                "device": str(self.gen_model.device), "dtype": str(self.gen_model.dtype).removeprefix("torch.")}


class _LiveScores:
    """SASRec's scores for the rows' histories, computed as rows come (the decoders' ``cf`` scores;
    ``bigrec generate`` reads the same model's scores from a file). The last batch's rows are kept,
    so the decoder, the ranking and the baselines of one request score each history once."""

    def __init__(self, sasrec, num_items: int):
        self.sasrec, self._num_items = sasrec, num_items
        self._last: dict[tuple[int, ...], torch.Tensor] = {}
        self.scored = 0  # histories sent to the model so far

    @property
    def num_items(self) -> int:
        return self._num_items

    def align(self, rows: list[dict]) -> torch.Tensor:
        return self.score([row["history_item_id"] for row in rows])

    def score(self, histories: list[list[int]]) -> torch.Tensor:
        """[len(histories), N] float32 scores on the CPU."""
        keys = [tuple(int(i) for i in h) for h in histories]
        last = self._last
        missing = [k for k in dict.fromkeys(keys) if k not in last]
        if missing:
            fresh = self.sasrec.score([list(k) for k in missing]).float().cpu()
            self.scored += len(missing)
            last = {k: last[k] for k in keys if k in last} | dict(zip(missing, fresh, strict=True))
            self._last = last
        if not keys:
            return torch.empty(0, self._num_items)
        return torch.stack([last[k] for k in keys])


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
