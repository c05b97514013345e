"""The decoders of ``bigrec generate``: a batch of instruction rows in, one output dict per row out.

Each row gets ``num_beams`` returned sequences (the reference's ``"predict"`` list), or with
likelihood ranking ``candidates`` titles. The decodings (``--decoding``):

* ``free`` (the paper's, :class:`FreeDecoder`): a beam ends at the end of the title (EOS, a
  newline, or the quote that closes the opening one) rather than running to ``max_new_tokens``:
  small models otherwise drift on into a list of titles, which is slow and makes the text to
  ground worse (:mod:`bigrec.llm.generation`).
* ``constrained`` (:class:`ConstrainedDecoder`): beam search restricted to a trie of the
  catalogue titles (:mod:`bigrec.llm.constrained`), so every beam is a real item; rows also get
  ``"predict_ids"`` (per beam, every catalogue id with that title) and ``"predict_scores"``,
  which ``bigrec evaluate`` ranks first. Options: D3's length correction and CF guidance by a
  ``bigrec baseline`` score file.
* ``likelihood`` (:class:`LikelihoodDecoder`): no search; every catalogue title is scored by its
  log-probability given the prompt (:mod:`bigrec.llm.likelihood`), optionally minus
  ``prior_weight`` times its log-probability with an empty history; the best ``candidates`` are
  written in order as ``predict``/``predict_ids``/``predict_scores``. With a ``bigrec baseline``
  score file (``cf_scores``), the row's SASRec top ``candidates`` titles (history left out where the
  ranking leaves it out) have their titles scored exactly too, as ``cf_ids``/``cf_logp``, so that
  evaluation can rank likelihood + SASRec (:mod:`bigrec.grounding.likelihood_cf`) with no model.

Leaving a row's history out (``exclude_history``) is one mechanism for every decoder,
:class:`HistoryTitles`: the catalogue ids sharing a title with a history item, which free decoding
drops from its beams (rerunning a row whose every beam was one), constrained decoding masks in
its trie and likelihood ranking leaves out of its search. A caller may ask it per row (:class:`Ask`,
the service's per-request option); ``bigrec generate`` asks the config's for every row.

The layout the model was trained on (:mod:`bigrec.llm.layouts`, picked by :func:`layout_of`)
gives the prompts, the trie's token ids and the token that ends a title: with ``timeline`` the
prompt is the row's history as timeline lines, and a title ends at the line's separator.

Every decoder is built once per run by :func:`make_decoder` (catalogue, trie and priors are
built then, not per batch) and called per batch; the stage keeps the rows, the progress files
and the process split, so a decoding is added here without touching them. The stage also reads
the CF score file and hands it in (``cf``): its format belongs to :mod:`bigrec.evaluation`,
which ``llm`` does not import.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from bigrec.data.prompts import normalize_title, title_forms
from bigrec.llm.defaults import DECODINGS  # the one list of decodings, imported from here too
from bigrec.llm.generation import generate_batch
from bigrec.llm.layouts import Layout, get_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingConfig:
    """The settings the decoders read: ``bigrec generate``'s (:meth:`of` its ``Config``) or a served
    run's (``RunManifest.decoding_config``), so both decode through the same decoders."""

    decoding: str
    batch_size: int
    num_beams: int
    max_new_tokens: int
    length_penalty: float
    layout: str
    prompt_template: str
    category: str | None
    exclude_history: bool
    candidates: int
    search_nodes: int
    prior_weight: float
    length_correction: bool
    ghost_threshold: float
    cf_scores: str | None
    cf_weight: float
    catalog: str  # the catalogue file (id2name.txt) constrained decoding and likelihood ranking read

    @classmethod
    def of(cls, config: Any) -> DecodingConfig:
        """These fields of ``config`` (generate's ``Config``), the catalogue from its ``catalog_path()``."""
        names = [f.name for f in fields(cls) if f.name != "catalog"]
        return cls(**{name: getattr(config, name) for name in names}, catalog=str(config.catalog_path()))

    def catalog_path(self) -> Path:
        return Path(self.catalog)


class RowScores(Protocol):
    """A conventional model's item scores per row (:class:`bigrec.evaluation.scores.ScoreMatrix`)."""

    @property
    def num_items(self) -> int: ...

    def align(self, rows: list[dict]) -> torch.Tensor:
        """Scores [len(rows), num_items] in the order of ``rows``."""


@dataclass(frozen=True)
class Ask:
    """What one row asks of a decoder beyond the run's settings (a service request's options)."""

    exclude_history: bool  # leave the row's history titles out (:class:`HistoryTitles`)
    cf: bool = True  # likelihood with a CF model: also score that model's candidates (cf_ids, cf_logp)


class Decoder(Protocol):
    """Built by :func:`make_decoder`; called on a batch of rows and their prompts (same order) and,
    optionally, what each row asks (default: the config's ``exclude_history`` for every row); returns
    per row the fields generate adds to it (``predict``, ...)."""

    def __call__(self, rows: list[dict], prompts: list[str],
                 asks: Sequence[Ask] | None = None) -> list[dict[str, Any]]: ...

    def summary(self) -> str | None:
        """What this process's decoding is worth logging once its rows are done (None: nothing)."""


def make_decoder(config: DecodingConfig, model, tokenizer, prefill_dtype: torch.dtype | None = None,
                 cf: RowScores | None = None) -> Decoder:
    """The decoder ``config.decoding`` names; ``cf``: the scores of ``config.cf_scores`` (constrained
    decoding's guidance; likelihood ranking's second list of candidates)."""
    if config.decoding == "constrained":
        return ConstrainedDecoder(config, model, tokenizer, prefill_dtype, cf)
    if config.decoding == "likelihood":
        return LikelihoodDecoder(config, model, tokenizer, prefill_dtype, cf)
    if config.decoding != "free":
        raise ValueError(f"unknown decoding {config.decoding!r}; expected one of {', '.join(DECODINGS)}")
    return FreeDecoder(config, model, tokenizer, prefill_dtype)


def asks_of(config: DecodingConfig, rows: list[dict], asks: Sequence[Ask] | None) -> Sequence[Ask]:
    """What each row asks: ``asks`` as given, or the config's ``exclude_history`` for every row."""
    if asks is None:
        return [Ask(config.exclude_history)] * len(rows)
    if len(asks) != len(rows):
        raise ValueError(f"{len(asks)} asks for {len(rows)} rows")
    return asks


# --- layouts and histories --------------------------------------------------------------------

def layout_of(config: DecodingConfig) -> Layout:
    """The layout the model was trained on, its prompt worded in ``prompt_template`` and ``category``."""
    return get_layout(config.layout, config.prompt_template, config.category)


def history_ids(row: dict) -> list[int]:
    ids = row.get("history_item_id")
    if not isinstance(ids, list):
        raise ValueError(f"--exclude_history: row {row.get('row', '?')} has no history_item_id list")
    return [int(i) for i in ids]


class HistoryTitles:
    """The one way a decoder leaves a row's history out: every catalogue id sharing a title with an
    item of the row's ``history_item_id`` (:meth:`bigrec.data.catalog.Catalog.history_titles`), as
    the decoder needs it: ids, trie leaves, or the title texts a free beam must not be."""

    def __init__(self, catalog):
        self.catalog = catalog

    def items(self, row: dict) -> list[int]:
        return self.catalog.history_titles(history_ids(row))

    def leaves(self, trie, row: dict) -> list[int]:
        return trie.leaves_of(self.items(row))

    def texts(self, row: dict) -> set[str]:
        """The titles normalised as a beam is compared, each as the catalogue writes it and with its
        article in front (:func:`bigrec.data.prompts.title_forms`)."""
        return {normalize_title(form) for i in self.items(row) for form in title_forms(self.catalog.titles[i])}


def catalog_trie(config: DecodingConfig, layout: Layout, tokenizer):
    """(catalogue, its trie of titles as the model writes them) for constrained decoding and likelihood ranking."""
    from bigrec.data.catalog import read_catalog

    start = time.perf_counter()
    catalog = read_catalog(config.catalog_path())
    trie = layout.trie(tokenizer, catalog.titles)
    log.info("trie of %d titles (%d items, %d nodes, longest path %d tokens) built in %.1fs", len(trie.titles),
             trie.num_items, trie.num_nodes, trie.max_depth, time.perf_counter() - start)
    return catalog, trie


# --- the decoders -----------------------------------------------------------------------------

class FreeDecoder:
    """Free beam search, the paper's: ``num_beams`` titles per row, each cut at the end of its title.

    A row that asks to leave its history out never gets one of its history's titles back: beams that
    copy one are dropped, and a row whose every beam was a copy is generated again with 2x, then 4x
    the beams (its list may stay empty: ``[""]``)."""

    def __init__(self, config: DecodingConfig, model, tokenizer, prefill_dtype: torch.dtype | None = None):
        self.config, self.model, self.tokenizer, self.prefill_dtype = config, model, tokenizer, prefill_dtype
        self.stop = layout_of(config).stop_token(tokenizer)
        self._history: HistoryTitles | None = None  # the catalogue, read when a row first asks for it
        self.reruns = 0
        if config.exclude_history:  # every row will ask: a missing catalogue fails now, not after a batch
            self.history()

    def beams(self, prompts: list[str], num_beams: int) -> list[list[str]]:
        cfg = self.config
        return generate_batch(self.model, self.tokenizer, prompts, num_beams, cfg.max_new_tokens,
                              cfg.length_penalty, self.prefill_dtype, self.stop)

    def history(self) -> HistoryTitles:
        if self._history is None:
            from bigrec.data.catalog import read_catalog

            self._history = HistoryTitles(read_catalog(self.config.catalog_path()))
        return self._history

    def __call__(self, rows: list[dict], prompts: list[str],
                 asks: Sequence[Ask] | None = None) -> list[dict[str, Any]]:
        num_beams = self.config.num_beams
        results = []
        for row, prompt, beams, ask in zip(rows, prompts, self.beams(prompts, num_beams),
                                           asks_of(self.config, rows, asks), strict=True):
            if not ask.exclude_history:
                results.append({"predict": beams})
                continue
            seen = self.history().texts(row)
            kept = [b for b in beams if normalize_title(b) not in seen]
            for factor in (2, 4):
                if kept:
                    break
                self.reruns += 1
                kept = [b for b in self.beams([prompt], num_beams * factor)[0] if normalize_title(b) not in seen]
            results.append({"predict": kept[:num_beams] or [""]})  # "": nothing new was generated
        return results

    def summary(self) -> str | None:
        if not self.reruns:
            return None
        return f"{self.reruns} reruns with more beams for rows whose every beam copied the history"


class ConstrainedDecoder:
    """Constrained decoding of a batch of rows: the trie is built once, CF scores aligned per batch."""

    def __init__(self, config: DecodingConfig, model, tokenizer, prefill_dtype: torch.dtype | None = None,
                 cf: RowScores | None = None):
        if bool(config.cf_scores) != (cf is not None):
            raise ValueError("constrained decoding takes the scores of --cf_scores (cf) exactly when it is given")
        self.config, self.model, self.tokenizer, self.prefill_dtype = config, model, tokenizer, prefill_dtype
        self.layout = layout_of(config)
        catalog, self.trie = catalog_trie(config, self.layout, tokenizer)
        self.history = HistoryTitles(catalog)
        self.cf = cf
        if self.cf is not None and self.cf.num_items != len(catalog):
            raise ValueError(f"{config.cf_scores}: {self.cf.num_items} item columns, but the catalogue "
                             f"{catalog.path} has {len(catalog)} items")
        if config.prior_weight:  # -log p(title | no history) per item: the CF guidance's item scores
            from bigrec.llm.likelihood import TitleScorer

            self.prior_scorer = TitleScorer(model, tokenizer, self.trie, autocast=prefill_dtype)
        self.stats: dict[str, float] = {}

    def item_prior(self, prompt: str) -> torch.Tensor:
        """[N] -log p(title | ``prompt``) per catalogue item (far below every title for an item without one);
        the scorer keeps each prompt's prior, so spreading it over the items is all that repeats."""
        leaf = self.prior_scorer.prior(prompt)
        items = self.trie.item_leaf
        scores = torch.full((self.trie.num_items,), float(-leaf.max()) - 1e4)
        scores[items >= 0] = -leaf[items[items >= 0]]
        return scores

    def __call__(self, rows: list[dict], prompts: list[str],
                 asks: Sequence[Ask] | None = None) -> list[dict[str, Any]]:
        from bigrec.llm.constrained import constrained_generate

        cfg = self.config
        asks = asks_of(cfg, rows, asks)
        exclude = [self.history.items(r) if a.exclude_history else [] for r, a in zip(rows, asks, strict=True)]
        cf = self.cf.align(rows) if self.cf is not None else None
        weight = cfg.cf_weight
        if cfg.prior_weight:
            cf = torch.stack([self.item_prior(self.layout.empty_history_prompt(r)) for r in rows])
            weight = cfg.prior_weight
        out = constrained_generate(
            self.model, self.tokenizer, prompts, self.trie, num_beams=cfg.num_beams, batch_size=len(prompts),
            length_penalty=cfg.length_penalty, length_correction=cfg.length_correction, cf_scores=cf,
            cf_weight=weight, max_new_tokens=None, ghost_threshold=cfg.ghost_threshold, stats=self.stats,
            prefill_dtype=self.prefill_dtype,
            exclude_items=exclude if any(exclude) else None)
        return [{"predict": [b.text for b in beams], "predict_ids": [list(b.item_ids) for b in beams],
                 "predict_scores": [round(b.score, 6) for b in beams]} for beams in out]

    def summary(self) -> str | None:
        if not self.stats:
            return None
        return (f"constrained decoding {self.stats['generate_seconds']:.1f}s in generate, "
                f"{self.stats['processor_seconds']:.1f}s of it in the trie processor")


class LikelihoodDecoder:
    """Likelihood ranking of a batch of rows: the trie and the no-history priors are built once."""

    def __init__(self, config: DecodingConfig, model, tokenizer, prefill_dtype: torch.dtype | None = None,
                 cf: RowScores | None = None):
        from bigrec.llm.likelihood import TitleScorer

        if bool(config.cf_scores) != (cf is not None):
            raise ValueError("likelihood ranking takes the scores of --cf_scores (cf) exactly when it is given")
        self.config, self.layout = config, layout_of(config)
        catalog, self.trie = catalog_trie(config, self.layout, tokenizer)
        self.history = HistoryTitles(catalog)
        if cf is not None and cf.num_items != len(catalog):
            raise ValueError(f"{config.cf_scores}: {cf.num_items} item columns, but the catalogue "
                             f"{catalog.path} has {len(catalog)} items")
        self.cf = cf
        self.scorer = TitleScorer(model, tokenizer, self.trie, autocast=prefill_dtype,
                                  batch_size=config.batch_size)  # a generate batch is searched at once
        self.certified: list[int] = []

    def __call__(self, rows: list[dict], prompts: list[str],
                 asks: Sequence[Ask] | None = None) -> list[dict[str, Any]]:
        cfg, trie = self.config, self.trie
        asks = asks_of(cfg, rows, asks)
        prior = None
        if cfg.prior_weight:
            prior = [cfg.prior_weight * self.scorer.prior(self.layout.empty_history_prompt(r)) for r in rows]
        excluded = [self.history.leaves(trie, r) if a.exclude_history else [] for r, a in zip(rows, asks, strict=True)]
        rankings = self.scorer.rank(prompts, cfg.candidates, prior, excluded, max_nodes=cfg.search_nodes)
        self.certified.extend(r.certified for r in rankings)
        out = [{"predict": [trie.titles[leaf] for leaf in r.leaves],
                "predict_ids": [list(trie.leaf_items[leaf]) for leaf in r.leaves],
                "predict_scores": [round(s, 6) for s in r.scores], "predict_certified": r.certified}
               for r in rankings]
        wanted = [r for r, a in enumerate(asks) if a.cf]
        if self.cf is not None and wanted:
            scores = self.cf.align([rows[r] for r in wanted])
            for j, r in enumerate(wanted):
                row_out = out[r]
                leaves = cf_leaves(trie, scores[j], cfg.candidates, excluded[r])
                logp = self.scorer.exact([prompts[r]], torch.tensor(leaves))[0] if leaves else torch.zeros(0)
                if prior is not None and leaves:
                    logp = logp - prior[r][leaves]
                row_out.update(cf_ids=[list(trie.leaf_items[leaf]) for leaf in leaves],
                               cf_logp=[round(float(v), 6) for v in logp])
        return out

    def summary(self) -> str | None:
        if not self.certified:
            return None
        return (f"likelihood top 10 certified exact in {sum(c >= 10 for c in self.certified)} of "
                f"{len(self.certified)} rows (elsewhere the search ran out of --search_nodes)")


def cf_leaves(trie, scores: torch.Tensor, top: int, excluded: Sequence[int] = ()) -> list[int]:
    """A conventional model's ``top`` best titles (trie leaves) for a row, each by its best item, in
    the model's order (ties: the lower item id); items of the ``excluded`` leaves (the history's
    titles) and items with no title in the trie are passed over. ``scores``: the row's item scores [N],
    higher is better."""
    leaf_of = trie.item_leaf
    allowed = leaf_of >= 0
    if len(excluded):
        allowed &= ~torch.isin(leaf_of, torch.as_tensor(list(excluded), dtype=torch.long))
    items = torch.nonzero(allowed).squeeze(1)
    leaves: dict[int, None] = {}
    for i in items[torch.argsort(-scores[items].float(), stable=True)].tolist():
        leaves.setdefault(int(leaf_of[i]))
        if len(leaves) == top:
            break
    return list(leaves)
