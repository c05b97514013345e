"""Catalogue-constrained beam search, D3's length correction and CF guidance.

Free beam search lets a small model invent titles and collapse onto short generic strings.
Here every beam follows a path of :class:`bigrec.llm.trie.Trie`, so every returned sequence is a
catalogue title (and its item ids). Two remedies of D3 ("Decoding Matters", arXiv 2406.14900)
are options:

* length correction: tokens the model wrote with near certainty (probability >= a threshold,
  "ghost" tokens such as the rest of a title once its start is written) do not count towards
  the length normalisation. transformers 5 normalises finished hypotheses inside
  ``_beam_search`` by the plain token count and offers no hook for another length, so this is
  applied as a **rescoring of the finished beams**: the search itself runs with the plain
  ``length_penalty``, the returned beams are then re-ordered by
  ``sum logprob / (#tokens with p < threshold) ** length_penalty``. It can re-order the
  ``num_beams`` items the search found, not bring in items the search dropped.
* CF guidance (D3's text-free assistant): a conventional model's item scores ``s`` (row-wise
  log-softmax) steer the search through the trie. Each allowed token gets
  ``cf_weight * (value(child) - value(node))`` added, ``value(node)`` = max of ``s`` over the
  items under the node, so along a finished path the bonus adds up to
  ``cf_weight * (s(item) - max s)``: the beam score becomes ``log p_LM + cf_weight * s`` up to
  a per-row constant, while partial beams are scored by the best item they can still reach.

Scores are the model's log-probabilities at each step (the processor records them per row and
trie node, so no per-step vocabulary-sized tensors are kept), summed with the CF bonus and
divided by ``length ** length_penalty`` as transformers does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bigrec.llm.defaults import CF_WEIGHT, CONSTRAINED_BEAMS, GHOST_THRESHOLD, LENGTH_PENALTY
from bigrec.llm.kv_cache import cache_kwarg, shared_prompt
from bigrec.llm.trie import Trie

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Beam:
    """One returned beam: a catalogue title and every item id that carries it."""

    item_ids: tuple[int, ...]
    title: str
    text: str  # the generated response, decoded and stripped (the reference "predict" string)
    score: float  # what the beams are ordered by (see constrained_generate)
    logprob: float  # sum of the model's token log-probabilities (no CF bonus)
    length: int  # generated tokens, EOS included
    counted_length: int  # tokens below the ghost threshold (the length correction's length)


class TrieLogitsProcessor(LogitsProcessor):
    """Allows each beam only the trie children of its generated prefix; everything else is -inf.

    Beam ``b`` of the flattened ``[rows * num_beams, ...]`` batch belongs to row
    ``b // num_beams``. The node of each beam is found incrementally: the beam's prefix minus its
    last token was a running beam at the previous step, found by comparing prefixes within the
    row (one ``[rows, K, K, t]`` comparison), then one vectorised trie step; a full walk from
    the root is the fallback. The mask is built with index operations over the allowed edges
    only. ``cf_values`` ([rows, M + 1], :meth:`Trie.node_values`) adds CF guidance.
    """

    def __init__(self, trie: Trie, prompt_len: int, num_beams: int, cf_values: torch.Tensor | None = None,
                 cf_weight: float = CF_WEIGHT, banned: torch.Tensor | None = None):
        self.trie = trie
        self.banned = banned  # [rows, M + 1] bool: leaves (titles) a row may not end on
        self.prompt_len = prompt_len
        self.num_beams = num_beams
        self.cf_values = cf_values if cf_weight else None
        self.cf_weight = cf_weight
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (generated ids, nodes) of the last call
        self.node_logprob: torch.Tensor | None = None  # [rows, M + 1] model log-prob of entering each node
        self.seconds = 0.0  # time spent in this processor (for benchmarks)
        self.calls = 0
        self.incremental = 0  # calls that found the nodes incrementally (the rest walked from the root)

    def nodes_of(self, gen: torch.Tensor) -> torch.Tensor:
        """Trie node of each generated prefix ``gen`` [B * K, t]."""
        n, t = gen.shape
        zero = torch.zeros(n, dtype=torch.long, device=gen.device)
        if t == 0:
            return zero
        if t == 1:
            return self.trie.step(zero, gen[:, 0])
        if self.prev is not None and self.prev[0].shape == (n, t - 1):
            prev_gen, prev_nodes = self.prev
            k = self.num_beams
            rows = n // k
            head = gen[:, :-1].reshape(rows, k, 1, t - 1)
            same = (head == prev_gen.reshape(rows, 1, k, t - 1)).all(-1)  # [rows, K, K]
            if bool(same.any(-1).all()):
                parent = same.to(torch.uint8).argmax(-1)  # first matching previous beam
                parent_nodes = prev_nodes.reshape(rows, k).gather(1, parent).reshape(-1)
                self.incremental += 1
                return self.trie.step(parent_nodes, gen[:, -1])
        nodes = zero
        for j in range(t):
            nodes = self.trie.step(nodes, gen[:, j])
        return nodes

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.perf_counter()
        tensors = self.trie.to(scores.device)
        gen = input_ids[:, self.prompt_len:]
        nodes = self.nodes_of(gen)
        self.prev = (gen, nodes)
        # Allowed edges of every beam, flattened: beam_of[e], edge[e].
        lo, hi = tensors["ptr"][nodes], tensors["ptr"][nodes + 1]
        counts = hi - lo
        beam_of = torch.repeat_interleave(torch.arange(len(nodes), device=scores.device), counts)
        first = torch.cumsum(counts, 0) - counts
        edge = lo[beam_of] + torch.arange(len(beam_of), device=scores.device) - first[beam_of]
        tokens, child = tensors["edge_token"][edge], tensors["edge_child"][edge]
        rows = beam_of // self.num_beams
        values = scores[beam_of, tokens]
        if self.node_logprob is None:
            n_rows = len(nodes) // self.num_beams
            self.node_logprob = torch.full((n_rows, self.trie.num_nodes + 1), float("nan"), device=scores.device)
        self.node_logprob[rows, child] = values
        if self.cf_values is not None:
            values = values + self.cf_weight * (self.cf_values[rows, child] - self.cf_values[rows, nodes[beam_of]])
        if self.banned is not None:
            values = values.masked_fill(self.banned[rows, child], float("-inf"))
        scores.fill_(float("-inf"))  # in place: the log-probs are a fresh tensor of this step
        scores[beam_of, tokens] = values
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return scores


def banned_leaves(trie: Trie, items: Sequence[Sequence[int]], device) -> torch.Tensor:
    """[rows, M + 1] bool: the nodes a row may not enter: the leaf of each of its items' titles
    (items outside the trie ignored), and every node whose titles below are all such leaves. A beam
    let into a prefix that only an excluded title completes would find every token masked, and a
    row whose beams all did so came back with no title at all."""
    m = trie.num_nodes
    marks = torch.zeros(len(items) + 1, m, dtype=torch.long)  # per row its excluded leaves; last row: all
    marks[-1, trie.leaf_node] = 1
    for r, ids in enumerate(items):
        marks[r, [int(trie.leaf_node[lf]) for lf in trie.leaves_of(ids)]] = 1
    cum = torch.nn.functional.pad(torch.cumsum(marks, 1), (1, 0))
    below = cum[:, trie.subtree_end[:m]] - cum[:, :m]  # marked leaves in each node's subtree (preorder)
    banned = torch.zeros(len(items), m + 1, dtype=torch.bool)
    banned[:, :m] = below[:-1] == below[-1]
    return banned.to(device)


def cf_log_scores(cf_scores: torch.Tensor, floor: float = -1e4) -> torch.Tensor:
    """Row-wise log-softmax of a conventional model's item scores, floored to stay finite."""
    return torch.log_softmax(cf_scores.float(), dim=-1).clamp(min=floor)


@contextlib.contextmanager
def beam_search_only(model) -> Iterator[None]:
    """Within the block the model's generation config asks for no logits processor.

    ``generate`` runs the processors the model's own config asks for (repetition penalty,
    temperature, top-k, ...) before the ones passed in, and fills a passed config's unset
    fields from the model's; the trie processor records the scores it sees as the model's
    log-probabilities, so nothing may change them first. The block's config keeps only the
    special token ids.
    """
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig(**{k: getattr(own, k, None) for k in (
        "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")})
    try:
        yield
    finally:
        model.generation_config = own


def constrained_generate(model, tokenizer, prompts: Sequence[str], trie: Trie, num_beams: int = CONSTRAINED_BEAMS,
                         batch_size: int = 4, length_penalty: float = LENGTH_PENALTY, length_correction: bool = False,
                         cf_scores: torch.Tensor | None = None, cf_weight: float = CF_WEIGHT,
                         max_new_tokens: int | None = None, ghost_threshold: float = GHOST_THRESHOLD,
                         share_prompt_cache: bool = True, stats: dict | None = None,
                         prefill_dtype: torch.dtype | None = None,
                         exclude_items: Sequence[Sequence[int]] | None = None) -> list[list[Beam]]:
    """Catalogue-constrained beam search: per prompt, its beams (best first) as :class:`Beam`.

    ``prompts`` are full prompt texts (``prompt_for_row``), left padded here; ``cf_scores``
    [len(prompts), trie.num_items] are item scores aligned with the prompts. ``max_new_tokens``
    defaults to the trie's longest path. Beams are ordered by score: with
    ``length_correction`` the D3 corrected score (a rescoring of the finished beams, see the
    module docstring), else transformers' ``(logprob + CF bonus) / length ** length_penalty``.

    A row gets fewer than ``num_beams`` beams when the catalogue has fewer distinct titles
    (``num_beams`` is capped at their number) or when the search returned a sequence twice or
    one that is no complete title (never observed; dropped rather than filled). ``stats``, if
    given, receives ``processor_seconds`` and ``generate_seconds``.

    ``share_prompt_cache``: transformers copies each prompt ``num_beams`` times before its
    prefill; here the prompt (all but its last token) is encoded once per row, the prefix all
    rows share once per batch, and the KV cache repeated for the beams, which saves most of the
    prefill at 10 to 50 beams. ``prefill_dtype``: the dtype that encoding computes in
    (:func:`bigrec.llm.kv_cache.shared_prompt`). ``exclude_items``: per prompt, item ids whose
    titles its beams may not end on (a user's history: recommend something new); the trie's
    final edge into each such title is masked for that row only.
    """
    if num_beams < 1 or batch_size < 1:
        raise ValueError(f"num_beams and batch_size must be at least 1, got {num_beams} and {batch_size}")
    if exclude_items is not None and len(exclude_items) != len(prompts):
        raise ValueError(f"exclude_items has {len(exclude_items)} rows for {len(prompts)} prompts")
    if cf_scores is not None and tuple(cf_scores.shape) != (len(prompts), trie.num_items):
        raise ValueError(f"cf_scores has shape {tuple(cf_scores.shape)}, expected "
                         f"({len(prompts)}, {trie.num_items}): one row per prompt, one column per item")
    beams = min(num_beams, len(trie.titles))
    max_new = max_new_tokens or trie.max_depth
    if max_new < trie.max_depth:
        log.warning("max_new_tokens=%d is below the longest title path (%d tokens): longer titles cannot be "
                    "generated", max_new, trie.max_depth)
    device = model.device
    results: list[list[Beam]] = []
    stats = stats if stats is not None else {}
    stats.setdefault("processor_seconds", 0.0)
    stats.setdefault("generate_seconds", 0.0)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for lo in range(0, len(prompts), batch_size):
            batch = list(prompts[lo:lo + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            prompt_len = enc["input_ids"].shape[1]
            cf_values = None
            if cf_scores is not None and cf_weight:
                cf_values = trie.node_values(cf_log_scores(cf_scores[lo:lo + batch_size].to(device)))
            banned = None if exclude_items is None else banned_leaves(trie, exclude_items[lo:lo + batch_size], device)
            proc = TrieLogitsProcessor(trie, prompt_len, beams, cf_values, cf_weight, banned)
            start = time.perf_counter()
            with torch.inference_mode():
                extra = {}
                if share_prompt_cache and prompt_len > 1:
                    enc, extra[cache_kwarg(model)] = shared_prompt(model, enc, tokenizer.pad_token_id, beams, max_new,
                                                        prefill_dtype)
                with beam_search_only(model):
                    out = model.generate(
                        **enc, **extra, num_beams=beams, num_return_sequences=beams, do_sample=False,
                        max_new_tokens=max_new, length_penalty=length_penalty, eos_token_id=trie.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, logits_processor=LogitsProcessorList([proc]))
            stats["generate_seconds"] += time.perf_counter() - start
            stats["processor_seconds"] += proc.seconds
            gen = out[:, prompt_len:].cpu()
            node_lp = proc.node_logprob.cpu()
            for i in range(len(batch)):
                row = _row_beams(tokenizer, trie, gen[i * beams:(i + 1) * beams], node_lp[i],
                                 None if cf_values is None else cf_values[i].cpu(), cf_weight, length_penalty,
                                 length_correction, ghost_threshold)
                if banned is not None:  # a row with fewer allowed titles than beams: no banned filler
                    row = [b for b in row if not bool(banned[i, trie.leaf_node[trie.item_leaf[b.item_ids[0]]]])]
                results.append(row)
    finally:
        tokenizer.padding_side = side
    return results


def _row_beams(tokenizer, trie: Trie, seqs: torch.Tensor, node_lp: torch.Tensor, cf_values: torch.Tensor | None,
               cf_weight: float, length_penalty: float, length_correction: bool,
               ghost_threshold: float) -> list[Beam]:
    """Score one row's returned sequences from the recorded log-probs; keep distinct titles, best first."""
    log_ghost = math.log(ghost_threshold)
    found: list[tuple[float, int, Beam]] = []
    seen: set[int] = set()
    for pos, seq in enumerate(seqs.tolist()):
        leaf, entered = trie.walk(seq)
        if leaf is None or leaf in seen:
            continue
        lps = node_lp[entered]
        if torch.isnan(lps).any():  # a token this row never scored: not a sequence of this search
            continue
        seen.add(leaf)
        logprob = float(lps.sum())
        total = logprob
        if cf_values is not None:
            total += cf_weight * float(cf_values[entered[-1]] - cf_values[0])
        counted = int((lps < log_ghost).sum())
        length = len(entered)
        denom = max(counted, 1) if length_correction else length
        text = tokenizer.decode(seq[:length], skip_special_tokens=True).strip()
        beam = Beam(tuple(trie.leaf_items[leaf]), trie.titles[leaf], text, total / denom ** length_penalty,
                    logprob, length, counted)
        found.append((-beam.score, pos, beam))
    found.sort(key=lambda x: (x[0], x[1]))
    return [b for _, _, b in found]


def beam_item_lists(row_beams: Sequence[Sequence[Beam]]) -> list[list[int]]:
    """Per row, all item ids of its beams in beam order (the input of :func:`bigrec.grounding.ranking.rank_with_beams`)."""
    return [[i for beam in beams for i in beam.item_ids] for beams in row_beams]
