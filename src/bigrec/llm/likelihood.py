"""Likelihood ranking: every catalogue title scored by the model's own log-probability.

A title's score is the sum of its tokens' log-probabilities given the prompt (EOS, or the
timeline separator, included; no length normalisation), as D3 and MiniOneRec rank items. Every
item gets its own score, so the list cannot collapse onto a few titles the way beam search does.

Titles share prefixes, so they are scored over the catalogue's trie (:class:`bigrec.llm.trie.Trie`)
with tree attention: the prompt is encoded once, then the trie's tokens go through the model in
chunks over the prompt's KV cache, each attending to the prompt and to its own ancestors only (a
4D mask), at the position it would have right after the prompt. Each trie node's output is the
next-token distribution over its children; no title is run on its own.

A full catalogue is still ~10 tokens a title, and a row needs only its best titles, so
:meth:`TitleScorer.rank` searches the trie best first: a prefix's log-probability is an upper bound
on the score of every title below it (log-probabilities are <= 0), so expanding the best unexpanded
prefixes until the ``top`` best finished titles beat every remaining bound gives the exact top
``top`` without touching most of the trie. Each step expands a few dozen prefixes of every row at
once; their keys and values stay in the cache, so a trie node goes through the model once (and,
once the cache is large, attends over its ancestors gathered from it, not the whole cache). A row
that runs out of its node budget places the titles not reached by their bound, and ``certified``
says how many of its first places are still provably exact. :meth:`TitleScorer.exact` scores a
whole trie (the prior, and tests) in chunks over the prompt's cache instead.

The no-history prior: ``prior_weight`` w subtracts w * log p(title | the prompt with an empty
history), computed once per prompt template over the whole catalogue, from every score (and bound),
which pushes down titles the model names whatever the history; the search's bounds then add the
best ``-w * prior`` under each prefix.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from bigrec.llm.defaults import SEARCH_NODES
from bigrec.llm.kv_cache import SharedPromptLayer, cache_kwarg, decoder_of
from bigrec.llm.trie import Trie

PACKED_SDPA = "bigrec_packed_gqa_sdpa"


@dataclass
class _TreeKeys:
    """What a search step's queries attend to: the prompt's real tokens (``prompt_mask`` [B, 1, 1, P],
    0 or -inf), then the cache positions ``keys`` [B, U] of every node some query of the row needs
    (their union), of which each query may see those in ``allowed`` [B, 1, W, U]: its ancestors and itself."""

    prompt_mask: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor
    _made: dict = field(default_factory=dict)

    def masks(self, dtype: torch.dtype, groups: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt mask, near mask tiled for ``groups`` query heads, both additive in ``dtype``; key
        index [B, 1, U, 1]) on ``device``: made for a step's first layer, the same for every other."""
        if (dtype, groups) not in self._made:
            near = torch.zeros(self.allowed.shape, dtype=dtype).masked_fill_(~self.allowed, float("-inf"))
            self._made[dtype, groups] = (self.prompt_mask.to(device, dtype), near.repeat(1, 1, groups, 1).to(device),
                                         self.keys[:, None, :, None].to(device))
        return self._made[dtype, groups]


_TREE_KEYS: contextvars.ContextVar[_TreeKeys | None] = contextvars.ContextVar("bigrec_tree_keys", default=None)


def _tree_attention(query, key, value, tree: _TreeKeys, scaling: float | None) -> torch.Tensor:
    """Attention of a search step's trie nodes over the prompt and the nodes they descend from only.

    A dense mask makes every node attend over every node fed so far, almost all masked: at 3,072
    nodes that was half a search's time. Here the step's queries attend over the prompt, then over
    the union of their ancestors gathered from the cache, each with SDPA's CPU flash kernel (which
    returns its log-sum-exp too), and the two softmaxes are merged by their log-sum-exps: the same
    attention up to rounding. Returns [B, W, H, D] as transformers' attention functions do."""
    b, heads, w, dim = query.shape
    kv, dv = key.shape[1], value.shape[-1]
    groups, prompt, u = heads // kv, tree.prompt_mask.shape[-1], tree.keys.shape[-1]
    scale = scaling if scaling is not None else dim ** -0.5
    # in the dtype SDPA would compute in: autocast's, which a raw kernel call does not apply
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    packed = query.reshape(b, kv, groups * w, dim).to(dtype)  # each key/value head's query heads, stacked
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    prompt_mask, near_mask, at = tree.masks(dtype, groups, key.device)
    out_p, lse_p = flash(packed, key[:, :, :prompt].to(dtype), value[:, :, :prompt].to(dtype),
                         attn_mask=prompt_mask, scale=scale)
    near_k = key.gather(2, at.expand(b, kv, u, dim)).to(dtype)
    near_v = value.gather(2, at.expand(b, kv, u, dv)).to(dtype)
    out_t, lse_t = flash(packed, near_k, near_v, attn_mask=near_mask, scale=scale)
    total = torch.logaddexp(lse_p, lse_t)
    out = out_p.float() * (lse_p - total).exp()[..., None] + out_t.float() * (lse_t - total).exp()[..., None]
    return out.to(dtype).reshape(b, heads, w, dv).transpose(1, 2).contiguous()


def _packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA for grouped-query attention under a custom mask, without repeating the keys and values.

    transformers repeats each key/value head for its query heads whenever a mask is given (its SDPA
    path may skip that only without one), which copies a row's whole cache at every layer and step,
    the largest cost of a long search (docs/performance.md). Here each key/value head's query heads
    are stacked along the query axis instead, and the mask tiled to match: the same products, with
    a copy of the queries and the mask only. In a search step (:data:`_TREE_KEYS` set), the mask is
    a placeholder and the step attends as :func:`_tree_attention` says."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tree = _TREE_KEYS.get()
    if tree is not None:
        return _tree_attention(query, key, value, tree, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, q, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, heads // groups, groups * q, dim), key, value,
        attn_mask=attention_mask.repeat(1, 1, groups, 1), dropout_p=dropout, scale=scaling)
    return out.reshape(b, heads, q, value.shape[-1]).transpose(1, 2).contiguous(), None


@functools.cache
def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, _packed_gqa_sdpa)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the prompts' masks, made as SDPA's


@dataclass
class Ranking:
    """One row's ranking: leaf indices of the trie in order, with their scores."""

    leaves: list[int]  # best first: titles scored exactly, then (past a search budget) by their bound
    scores: list[float]  # their scores or bounds (prior applied)
    certified: int  # the first this many places are provably the exact ranking's


class TitleScorer:
    """Scores trie titles for prompts. ``autocast``: dtype of the matrix products (None: the model's)."""

    def __init__(self, model, tokenizer, trie: Trie, autocast: torch.dtype | None = None,
                 chunk_tokens: int = 256, batch_size: int = 4):
        self.model, self.tokenizer, self.trie = model, tokenizer, trie
        self.autocast, self.chunk_tokens, self.batch_size = autocast, chunk_tokens, batch_size
        self.body = decoder_of(model)
        self.head = model.get_output_embeddings()
        self.cache_arg = cache_kwarg(model)
        self.bool_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"  # SDPA takes booleans
        # the SDPA attention layers' config: their calls go through _packed_gqa_sdpa
        self._sdpa_config = next((m.config for m in self.body.modules() if hasattr(m, "num_key_value_groups")
                                  and getattr(m, "config", None) is not None), None) if self.bool_mask else None
        # whether the calls attend through _packed_gqa_sdpa (false: transformers' SDPA, which repeats
        # each key/value head for its query heads; tree attention needs the packed form)
        self.packed_gqa = self._sdpa_config is not None
        # search steps attend over their ancestors only (:func:`_tree_attention`, on SDPA's CPU kernel)
        # once this many nodes are fed: below, one call over the dense mask costs less than its two
        self.tree_attention = self._sdpa_config is not None and model.device.type == "cpu"
        self.tree_from = 1024
        m = trie.num_nodes
        self.node_token = torch.full((m,), -1, dtype=torch.long)
        self.node_token[trie.edge_child] = trie.edge_token
        self.node_parent = torch.full((m,), -1, dtype=torch.long)
        self.node_parent[trie.edge_child] = trie.edge_parent
        self.depth = trie.node_depth[:m]
        self.end = trie.subtree_end[:m]
        self.inner = torch.tensor([bool(c) for c in trie.children])  # nodes with children (fed to the model)
        self.inner[0] = False  # the root is the prompt's last token
        self.leaf_node = trie.leaf_node
        # each leaf's ancestors (root excluded, leaf itself excluded) as a padded [L, max_depth] table
        paths = [self._ancestors(int(n)) for n in trie.leaf_node]
        width = max(len(p) for p in paths)
        self.leaf_path = torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.long)
        self.title_path = torch.cat([self.leaf_path, self.leaf_node[:, None]], 1)  # [L, depth], -1 padded
        self.levels = [torch.nonzero(self.depth == d).squeeze(1) for d in range(int(self.depth.max()) + 1)]
        self.priors: dict[str, torch.Tensor] = {}
        self._cast: list | None = None  # (linear layer, its parameters in the autocast dtype), made on first use
        _, self.root_tokens, self.root_children = self._edges(torch.tensor([0]))

    def _ancestors(self, node: int) -> list[int]:
        out = []
        node = int(self.node_parent[node])
        while node > 0:
            out.append(node)
            node = int(self.node_parent[node])
        return out[::-1]

    # --- the model pass ---------------------------------------------------------------------

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _autocast(self):
        weights = next(self.model.parameters()).dtype
        dtype = self.autocast or weights
        return torch.autocast(self.model.device.type, dtype=dtype, enabled=dtype != weights)

    @contextlib.contextmanager
    def _cast_weights(self) -> Iterator[None]:
        """Under autocast to a lower precision, the body's linear layers hold their weights (and biases)
        in it for the call, cast once and kept. Autocast would cast every weight again at every search
        step (it caches casts only of weights that require gradients). This is the recommender's case,
        whose fp32 weights the embedding shares; ``generate`` loads them in the autocast dtype already.
        The products are the same, as autocast casts them the same way; the embedding and the LM head
        (often the embedding's weight) are left alone."""
        weights = next(self.model.parameters()).dtype
        if self.autocast is None or self.autocast == weights:
            yield
            return
        if self._cast is None:
            self._cast = [(module, {name: torch.nn.Parameter(param.detach().to(self.autocast), requires_grad=False)
                                    for name, param in module._parameters.items() if param is not None})
                          for module in self.body.modules()
                          if isinstance(module, torch.nn.Linear) and module is not self.head]
        originals = [(module, dict(module._parameters)) for module, _ in self._cast]
        try:
            for module, cast in self._cast:
                module._parameters.update(cast)
            yield
        finally:
            for module, params in originals:
                module._parameters.update(params)

    @contextlib.contextmanager
    def _packed_attention(self) -> Iterator[None]:
        """For the call, an SDPA model's attention layers attend through :func:`_packed_gqa_sdpa`."""
        config = self._sdpa_config
        if config is None or not self.packed_gqa:
            yield
            return
        _register_packed_sdpa()
        config._attn_implementation = PACKED_SDPA
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    def _prompts(self, prompt_ids: list[list[int]]):
        """Encode the left-padded prompts once: (saved per-layer keys and values, the cache object,
        padded width, lengths, real-token mask, last prompt token's hidden state [B, D])."""
        b, p = len(prompt_ids), max(len(ids) for ids in prompt_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, p), pad, dtype=torch.long)
        real = torch.zeros((b, p), dtype=torch.bool)
        for r, row in enumerate(prompt_ids):
            ids[r, p - len(row):] = torch.tensor(row)
            real[r, p - len(row):] = True
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        device = self.model.device
        with self._autocast():
            out = self.body(input_ids=ids.to(device), attention_mask=real.long().to(device),
                            position_ids=positions.to(device), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        layers = getattr(cache, "layers", None) or []
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise ValueError("likelihood ranking needs a model whose KV cache keeps keys and values per layer")
        saved = [(layer.keys, layer.values) for layer in layers]
        lengths = real.sum(1)
        return saved, cache, p, lengths, real, out.last_hidden_state[:, -1]

    def _logprobs(self, hidden: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[k] fp32 log p(``tokens[i]`` | hidden state ``hidden[rows[i]]``), on the host.

        In slices of 256 states; only the asked entries are kept and leave the device: joining the
        slices' [n, vocabulary] log-softmaxes was a fifth of a search step's time with a shallow
        model, and copying them to the host a transfer per step on a GPU."""
        out = torch.empty(rows.numel())
        with self._autocast():
            for lo in range(0, hidden.shape[0], 256):
                pick = (rows >= lo) & (rows < lo + 256)
                if not bool(pick.any()):
                    continue
                logits = self.head(hidden[lo:lo + 256]).float()
                r, t = (rows[pick] - lo).to(logits.device), tokens[pick].to(logits.device)
                out[pick] = torch.log_softmax(logits, -1)[r, t].cpu()  # faster than logsumexp on a CPU
        return out

    def _root_logprobs(self, last: torch.Tensor) -> torch.Tensor:
        """[B, len(root_children)] log-probabilities of the titles' first tokens after each prompt."""
        b, k = last.shape[0], self.root_children.numel()
        rows = torch.arange(b).repeat_interleave(k)
        return self._logprobs(last, rows, self.root_tokens.repeat(b)).view(b, k)

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, 1, Q, K] mask from ``allowed`` [B, Q, K]: booleans for SDPA, added scores for eager attention."""
        if self.bool_mask:
            return allowed[:, None]
        weights = next(self.model.parameters()).dtype
        return torch.zeros(allowed[:, None].shape, dtype=weights).masked_fill_(~allowed[:, None],
                                                                               torch.finfo(weights).min)

    def _edges(self, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(parent's slot in ``parents``, token, child) of every edge out of ``parents``."""
        t = self.trie
        lo, hi = t.ptr[parents], t.ptr[parents + 1]
        counts = hi - lo
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        edge = torch.repeat_interleave(lo, counts) + torch.arange(int(counts.sum())) - starts
        slot = torch.repeat_interleave(torch.arange(parents.numel()), counts)
        return slot, t.edge_token[edge], t.edge_child[edge]

    def _chunks(self, fed: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """``fed`` (sorted) cut into pieces of ``chunk_tokens``, each led by its first node's ancestors
        from earlier pieces: (nodes, how many of them lead)."""
        out = []
        for lo in range(0, fed.numel(), self.chunk_tokens):
            own = fed[lo:lo + self.chunk_tokens]
            context = torch.tensor(self._ancestors(int(own[0])), dtype=torch.long)
            out.append((torch.cat([context, own]), context.numel()))
        return out

    @torch.no_grad()
    def edge_logprobs(self, prompt_ids: list[list[int]], fed: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """[B, M] log p(node's token | prompt, node's ancestors) for every node whose parent is the
        root or in ``fed`` (NaN elsewhere). ``fed``: inner nodes closed under ancestors, the same
        for every row or one tensor per row.

        The prompts are encoded once; the trie's tokens then go through in chunks over the saved
        prompt cache, each token attending to the prompt and to its ancestors in the chunk."""
        b, m = len(prompt_ids), self.trie.num_nodes
        per_row = [torch.sort(f).values for f in (fed if isinstance(fed, list) else [fed] * b)]
        out = torch.full((b, m), float("nan"))
        saved, cache, p, lengths, real, last = self._prompts(prompt_ids)
        out[:, self.root_children] = self._root_logprobs(last)
        chunks = [self._chunks(f) for f in per_row]
        device = self.model.device
        for k in range(max(len(c) for c in chunks)):
            pieces = [c[k] if k < len(c) else (torch.zeros(0, dtype=torch.long), 0) for c in chunks]
            width = max(nodes.numel() for nodes, _ in pieces)
            if width == 0:
                continue
            ids = torch.zeros((b, width), dtype=torch.long)
            positions = torch.zeros((b, width), dtype=torch.long)
            allowed = torch.zeros((b, width, p + width), dtype=torch.bool)
            allowed[:, :, p:] = torch.eye(width, dtype=torch.bool)  # padding attends to itself
            for r, (nodes, _) in enumerate(pieces):
                n = nodes.numel()
                ids[r, :n] = self.node_token[nodes]
                positions[r, :n] = lengths[r] + self.depth[nodes] - 1
                allowed[r, :n, :p] = real[r]
                allowed[r, :n, p:p + n] = ((nodes[None, :] <= nodes[:, None])
                                          & (nodes[:, None] < self.end[nodes][None, :]))
            mask = self._attention_mask(allowed)
            for layer, (keys, values) in zip(cache.layers, saved, strict=True):  # back to the prompt alone
                layer.keys, layer.values = keys, values
            with self._autocast():
                hidden = self.body(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   position_ids=positions.to(device), use_cache=True,
                                   **{self.cache_arg: cache}).last_hidden_state
            for r, (nodes, lead) in enumerate(pieces):
                own = nodes[lead:]
                if own.numel() == 0:
                    continue
                slot, tokens, children = self._edges(own)
                wanted = torch.unique(slot)
                out[r, children] = self._logprobs(hidden[r, (wanted + lead).to(device)],
                                                  torch.searchsorted(wanted, slot), tokens)
        return out

    def fed_for(self, leaves: torch.Tensor) -> torch.Tensor:
        """The inner nodes on the paths to ``leaves``: what must go through the model to score them."""
        nodes = torch.unique(self.leaf_path[leaves]).clamp(min=0)  # -1 padding becomes the root, never fed
        return nodes[self.inner[nodes]]

    def cumulative(self, edge_logp: torch.Tensor) -> torch.Tensor:
        """[B, M] sum of edge log-probs from the root to each node (NaN where an edge is missing)."""
        score = edge_logp.clone()
        score[:, 0] = 0.0
        for d in range(1, int(self.depth.max()) + 1):
            level = self.levels[d]
            score[:, level] = score[:, self.node_parent[level]] + edge_logp[:, level]
        return score

    # --- scores ---------------------------------------------------------------------------------

    def exact(self, prompts: Sequence[str], leaves: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] (or [B, len(leaves)]) exact title scores over the whole trie (or ``leaves``' part of it)."""
        leaves = torch.arange(len(self.trie.titles)) if leaves is None else leaves
        fed = self.fed_for(leaves)
        rows = []
        ids = self._encode(prompts)
        with self._cast_weights(), self._packed_attention():
            for lo in range(0, len(ids), self.batch_size):
                rows.append(self.cumulative(self.edge_logprobs(ids[lo:lo + self.batch_size], fed))
                            [:, self.leaf_node[leaves]])
        return torch.cat(rows)

    def prior(self, prompt: str) -> torch.Tensor:
        """[L] log p(title | ``prompt``), the no-history prompt; computed once per prompt."""
        if prompt not in self.priors:
            self.priors[prompt] = self.exact([prompt])[0]
        return self.priors[prompt]

    def rank(self, prompts: Sequence[str], top: int, prior: Sequence[torch.Tensor | None] | None = None,
             excluded: Sequence[Sequence[int]] | None = None, step_nodes: int = 24,
             max_nodes: int = SEARCH_NODES) -> list[Ranking]:
        """The ``top`` best titles for each prompt, by a best-first search of the trie.

        ``prior``: per row, w * log p(title | no history) to subtract (None: none). ``excluded``:
        per row, leaf indices left out of the ranking (the history's titles). A row stops once its
        ``top`` best finished titles beat every unexpanded branch's bound, or after ``max_nodes``
        trie tokens; ``certified`` says how many places are then provably exact."""
        n = len(self.trie.titles)
        ids = self._encode(prompts)
        out: list[Ranking] = []
        for lo in range(0, len(ids), self.batch_size):
            rows = range(lo, min(lo + self.batch_size, len(ids)))
            shift = torch.stack([prior[k] if prior is not None and prior[k] is not None else torch.zeros(n)
                                 for k in rows]).float()
            allowed = torch.ones((len(rows), n), dtype=torch.bool)
            for r, k in enumerate(rows):
                if excluded is not None and excluded[k]:
                    allowed[r, torch.tensor(list(excluded[k]), dtype=torch.long)] = False
            with self._cast_weights(), self._packed_attention():
                out.extend(self._search([ids[k] for k in rows], min(top, n), shift, allowed, step_nodes, max_nodes))
        return out

    def _subtree_best(self, value: torch.Tensor) -> torch.Tensor:
        """[B, M] the best of ``value`` [B, L] over the leaves under each node (-inf: none)."""
        best = torch.full((value.shape[0], self.trie.num_nodes), float("-inf"))
        best[:, self.leaf_node] = value
        for d in range(int(self.depth.max()), 0, -1):
            level = self.levels[d]
            best.scatter_reduce_(1, self.node_parent[level].expand(best.shape[0], -1), best[:, level], "amax")
        return best

    @staticmethod
    def _tree_keys(prompt_mask: torch.Tensor, at: torch.Tensor, ok: torch.Tensor, p: int) -> _TreeKeys:
        """The step's :class:`_TreeKeys` from each query's nodes: places after the prompt ``at``
        [B, W, A], where ``ok``. The row's union comes first in cache order, then padding."""
        b, w, _ = at.shape
        rows = torch.arange(b)[:, None, None].expand_as(at)
        needed = torch.zeros((b, int(at.max()) + 1), dtype=torch.bool)
        needed[rows[ok], at[ok]] = True
        u = int(needed.sum(1).max())
        keys = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)[:, :u]  # needed places first, in order
        local = torch.zeros(needed.shape, dtype=torch.long)
        local.scatter_(1, keys, torch.arange(u).expand(b, u))
        allowed = torch.zeros((b, w, u), dtype=torch.bool)
        query = torch.arange(w)[None, :, None].expand_as(at)
        allowed[rows[ok], query[ok], local[rows[ok], at[ok]]] = True
        return _TreeKeys(prompt_mask, keys + p, allowed[:, None])

    @torch.no_grad()
    def _search(self, prompt_ids: list[list[int]], top: int, shift: torch.Tensor, allowed: torch.Tensor,
                step_nodes: int, max_nodes: int) -> list[Ranking]:
        """Best-first search over the trie for a batch of prompts.

        Each node's priority is its prefix log-probability plus the best ``-shift`` of an allowed
        title under it: an upper bound on every score in its subtree, as log-probabilities are <= 0.
        Each step feeds the ``step_nodes`` highest-priority unexpanded nodes of every unfinished row
        through the model at once; their keys and values stay in the cache, so a node attends to its
        ancestors' cached states and is never fed twice."""
        b, m = len(prompt_ids), self.trie.num_nodes
        leaf = self.leaf_node
        bonus = self._subtree_best(torch.where(allowed, -shift, float("-inf")))
        score = torch.full((b, m), float("-inf"))
        expanded = torch.zeros((b, m), dtype=torch.bool)
        slot = torch.full((b, m), -1, dtype=torch.long)  # each fed node's place in the cache after the prompt
        saved, cache, p, lengths, real, last = self._prompts(prompt_ids)
        del saved
        # fed nodes are written in place after the prompt instead of concatenated (a copy of the
        # whole cache per layer and step); the buffer doubles if a long search outgrows it
        if all(type(layer) is DynamicLayer for layer in cache.layers):
            cache.layers = [SharedPromptLayer(layer.keys, layer.values, 1, min(max_nodes, 1024))
                            for layer in cache.layers]
        score[:, self.root_children] = self._root_logprobs(last)
        device, fed = self.model.device, 0

        def frontier_priority() -> torch.Tensor:  # [B, M] reached, unexpanded inner nodes; -inf elsewhere
            return torch.where(self.inner & ~expanded & (score > float("-inf")), score + bonus, float("-inf"))

        while True:
            frontier = frontier_priority()
            finished = torch.where(allowed, score[:, leaf] - shift, float("-inf"))
            kth = finished.topk(top, dim=1).values[:, -1]
            bound = frontier.max(1).values
            active = (kth < bound) & (bound > float("-inf")) & (expanded.sum(1) < max_nodes)
            if not active.any():
                break
            width = min(step_nodes, int((frontier[active] > float("-inf")).sum(1).max()))
            pri, picks = frontier.topk(width, dim=1)
            real_pick = (pri > float("-inf")) & active[:, None]
            picks = torch.where(real_pick, picks, 0)
            # the cache positions each pick attends to after the prompt: itself (padding too, so that
            # no query sees nothing), then its ancestors, all fed in earlier steps
            own = p + fed + torch.arange(width).expand(b, width)
            index, valid = [own], [torch.ones((b, width), dtype=torch.bool)]
            ancestor = self.node_parent[picks]
            rows = torch.arange(b)[:, None].expand(b, width)
            while bool((ancestor > 0).any()):
                keep = (ancestor > 0) & real_pick
                index.append(torch.where(keep, p + slot[rows, ancestor.clamp(min=0)], p))
                valid.append(keep)
                ancestor = torch.where(ancestor > 0, self.node_parent[ancestor.clamp(min=0)], 0)
            ids = torch.where(real_pick, self.node_token[picks], 0)
            positions = torch.where(real_pick, lengths[:, None] + self.depth[picks] - 1, 0)
            at, ok = torch.stack(index, 2), torch.stack(valid, 2)
            packed = self._sdpa_config is not None and self._sdpa_config._attn_implementation == PACKED_SDPA
            if self.tree_attention and packed and fed >= self.tree_from:  # (inside _packed_attention)
                attn = torch.zeros((b, 1, 1, p)).masked_fill_(~real[:, None, None], float("-inf"))
                tree = _TREE_KEYS.set(self._tree_keys(attn, at - p, ok, p))
            else:
                mask = torch.zeros((b, width, p + fed + width), dtype=torch.bool)
                mask[:, :, :p] = real[:, None, :]
                query_row, query_col, _ = torch.nonzero(ok, as_tuple=True)
                mask[query_row, query_col, at[ok]] = True
                attn, tree = self._attention_mask(mask), None
            try:
                with self._autocast():
                    hidden = self.body(input_ids=ids.to(device), attention_mask=attn.to(device),
                                       position_ids=positions.to(device), use_cache=True,
                                       **{self.cache_arg: cache}).last_hidden_state
            finally:
                if tree is not None:
                    _TREE_KEYS.reset(tree)
            r_idx, c_idx = torch.nonzero(real_pick, as_tuple=True)
            nodes = picks[r_idx, c_idx]
            expanded[r_idx, nodes] = True
            slot[r_idx, nodes] = fed + c_idx
            fed += width
            parent_slot, tokens, children = self._edges(nodes)
            logp = self._logprobs(hidden[r_idx.to(device), c_idx.to(device)], parent_slot, tokens)
            edge_row = r_idx[parent_slot]
            score[edge_row, children] = score[edge_row, nodes[parent_slot]] + logp
        done = (score[:, leaf] > float("-inf")) & allowed
        # a finished title's estimate is its exact score; one not reached yet gets its deepest scored
        # prefix's, still an upper bound (scores only fall down a path, so that is the path's lowest)
        known = score[:, self.title_path.clamp(min=0)].masked_fill(self.title_path < 0, float("inf"))
        estimate = known.masked_fill(known == float("-inf"), float("inf")).min(2).values - shift
        estimate = estimate.masked_fill(~allowed, float("-inf"))
        best = frontier_priority().max(1).values
        out = []
        for r in range(b):
            order = torch.argsort(estimate[r], descending=True, stable=True)[:min(top, int(allowed[r].sum()))]
            certified = int((done[r, order] & (estimate[r, order] >= best[r])).long().cumprod(0).sum())
            out.append(Ranking(order.tolist(), estimate[r, order].tolist(), certified))
        return out
