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
from bigrec.data.prompts import (
    DOMAINS,
    Domain,
    instruction_row,
    natural_title,
    normalize_title,
    prompt_for_row,
)
from bigrec.grounding.ranking import l2_distances
from bigrec.grounding.reweighting import blend, reweight
from bigrec.io import read_json
from bigrec.llm.models import resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 10  # bigrec prepare's default when the data folder does not say


class HistoryError(ValueError):
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
    score: float  # what the ranking sorts by, lower is better: L2 distance, or re-weighted with use_ci
    distance: float  # L2 distance between the grounded text's and the title's embeddings


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
    exclude_history: bool = False  # drop history items (and ids sharing their titles) from the ranking
    baselines: bool = False  # also SASRec's and popularity's top k for the same history


@dataclass
class Result:
    history: list[Match]
    generated: list[str]  # every beam, best first, cut at the end of its title
    grounded: str  # the text whose embedding ranked the items (the top beam, normalised)
    items: list[Item]
    use_ci: bool = False
    ranking: str = ""  # which ranking this is, and why (the run's validated default or the caller's choice)
    baselines: dict[str, list[Scored]] | None = None  # "sasrec", "popularity" -> top k (with Query.baselines)
    timing: dict[str, float] = field(default_factory=dict)

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
        if manifest.domain not in DOMAINS:
            raise ValueError(f"{run_dir}/run.yaml: unknown domain {manifest.domain!r}; "
                             f"expected one of {', '.join(DOMAINS)}")
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
        self.domain: Domain = DOMAINS[manifest.domain]
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
        # decode and embedding compute in one dtype (resolve_dtype), so generation shares every weight
        # the adapter leaves alone with the embedding model
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

    def prompt(self, titles: list[str]) -> str:
        if self.manifest.prompt_titles == "natural":  # as the model was trained (bigrec prepare --prompt_titles)
            titles = [natural_title(t) for t in titles]
        row = instruction_row(self.domain, titles[-self.max_history:], "")
        template = self.manifest.prompt_template
        if template == "alpaca":
            return prompt_for_row(row)
        return prompt_for_row(row, template=template, category=self.domain.plural)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        from bigrec.grounding.embedding import embed_texts
        from bigrec.grounding.options import grounding_of

        return embed_texts(self.embed_model, self.tokenizer, texts, grounding=grounding_of(self.manifest))

    def recommend(self, histories: list[list[str | int]], k: int = 10, use_ci: bool | None = None,
                  exclude_history: bool = False) -> list[Result]:
        """Top-``k`` catalogue items for each history (oldest item first)."""
        return self.recommend_queries([Query(list(h), k, use_ci, exclude_history) for h in histories])

    def recommend_queries(self, queries: list[Query]) -> list[Result]:
        """One generation call and one ranking pass for a batch of queries, each with its own k and options."""
        if not queries:
            return []
        for q in queries:
            if q.k < 1:
                raise ValueError(f"k must be at least 1, got {q.k}")
        if any(q.use_ci for q in queries):
            self._check_ci()
        use_ci = [self.default_ci if q.use_ci is None else q.use_ci for q in queries]
        from bigrec.llm.generation import generate_batch

        t0 = time.perf_counter()
        matches = self.match([q.history for q in queries])
        t1 = time.perf_counter()
        prompts = [self.prompt([m.title for m in row]) for row in matches]
        beams = generate_batch(self.gen_model, self.tokenizer, prompts, self.manifest.num_beams,
                               self.manifest.max_new_tokens, prefill_dtype=self.prefill_dtype)
        t2 = time.perf_counter()
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
            if q.exclude_history:
                row = row.clone()
                row[self.seen_ids([m.id for m in matches[r]])] = float("inf")
            order = torch.argsort(row, stable=True)[: q.k].tolist()  # ties: lower id first
            items = [Item(i, self.catalog.titles[i], float(row[i]), float(dist[r, i])) for i in order
                     if row[i] != float("inf")]
            results.append(Result(matches[r], beams[r], grounded[r], items, use_ci[r],
                                  self.ranking_label(use_ci[r], q.use_ci is None)))
        wanted = [r for r, q in enumerate(queries) if q.baselines]
        if wanted:
            lists = self.baseline_lists([[m.id for m in matches[r]] for r in wanted], [queries[r] for r in wanted])
            for r, found in zip(wanted, lists, strict=True):
                results[r].baselines = found
        t3 = time.perf_counter()
        timing = {"match_s": t1 - t0, "generate_s": t2 - t1, "rank_s": t3 - t2, "batch": len(queries)}
        for result in results:
            result.timing = dict(timing)
        return results

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

    def _check_ci(self) -> None:
        if self.sasrec is None:
            raise ValueError(f"use_ci needs a SASRec model, and the run {self.run_dir} has none "
                             "(run.yaml: sasrec is unset)")
        if self.manifest.ci_gamma is None:
            raise ValueError(f"use_ci needs ci_gamma in {self.run_dir}/run.yaml (chosen on validation by "
                             "bigrec evaluate); it is unset")

    @property
    def has_ci(self) -> bool:
        return self.sasrec is not None and self.manifest.ci_gamma is not None

    @property
    def default_ci(self) -> bool:
        """Re-weight by SASRec unless asked otherwise: where the run chose it on validation and can."""
        return bool(self.manifest.use_ci) and self.has_ci

    def ranking_label(self, use_ci: bool, by_default: bool) -> str:
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
    from bigrec.io import read_json

    meta = read_json(path / "model.json")
    digest = meta.get("catalog_digest")
    if model.config.num_items != len(catalog) or (digest and digest != catalog.digest):
        raise ValueError(f"{path}: SASRec was trained on another catalogue ({model.config.num_items} items) "
                         f"than {catalog.path} ({len(catalog)} items)")
