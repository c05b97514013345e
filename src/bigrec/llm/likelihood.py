"""Likelihood ranking: every catalogue title scored by the model's own log-probability.

A title's score is the sum of its tokens' log-probabilities given the prompt (EOS, or the
timeline separator, included; no length normalisation), as D3 and MiniOneRec rank items. Every
item gets its own score, so the list cannot collapse onto a few titles the way beam search does.

Titles share prefixes, so they are scored over the catalogue's trie (:class:`bigrec.llm.trie.Trie`)
with tree attention: the prompt is encoded once, then the trie's tokens go through the model in
chunks over the prompt's KV cache, each attending to the prompt and to its own ancestors only (a
4D mask), at the position it would have right after the prompt. Each trie node's output is the
next-token distribution over its children; no title is run on its own.

A full catalogue is still ~10 tokens a title, so by default a row is ranked in two passes:

1. the trie cut at ``prefix_depth`` tokens, the same for every row, batched across rows: each
   title's prefix log-probability, an upper bound on its full score (log-probabilities are <= 0);
2. the ``candidates`` titles with the highest bound, scored exactly, one row at a time.

Items outside the candidates follow them in the ranking. A row whose k-th exact score is at least
every other title's bound has an exact top k (``certified``): the cut changed nothing there.

The no-history prior: ``prior_weight`` w subtracts w * log p(title | the prompt with an empty
history), computed once per prompt template over the whole catalogue, from every score (and bound),
which pushes down titles the model names whatever the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bigrec.llm.kv_cache import cache_kwarg, decoder_of
from bigrec.llm.trie import Trie


@dataclass
class Ranking:
    """One row's ranking: leaf indices of the trie in order, with their scores."""

    leaves: list[int]  # best first: the exactly scored candidates
    scores: list[float]  # their scores (prior applied)
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
        self.priors: dict[str, torch.Tensor] = {}

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

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, V] next-token log-probabilities (fp32) of hidden states [n, D], in slices."""
        with self._autocast():
            return torch.cat([torch.log_softmax(self.head(hidden[i:i + 256]).float(), -1)
                              for i in range(0, hidden.shape[0], 256)])

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
        slot, tokens, children = self._edges(torch.tensor([0]))
        root = self._logprobs(last)[:, tokens.to(last.device)].cpu()
        out[:, children] = root
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
            if self.bool_mask:
                mask = allowed[:, None]
            else:  # eager attention adds the mask to the scores
                weights = next(self.model.parameters()).dtype
                mask = torch.zeros(allowed[:, None].shape, dtype=weights).masked_fill_(
                    ~allowed[:, None], torch.finfo(weights).min)
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
                logp = self._logprobs(hidden[r, (wanted + lead).to(device)])
                out[r, children] = logp[torch.searchsorted(wanted, slot).to(logp.device),
                                        tokens.to(logp.device)].cpu()
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
            level = torch.nonzero(self.depth == d).squeeze(1)
            score[:, level] = score[:, self.node_parent[level]] + edge_logp[:, level]
        return score

    # --- scores ---------------------------------------------------------------------------------

    def exact(self, prompts: Sequence[str], leaves: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] (or [B, len(leaves)]) exact title scores over the whole trie (or ``leaves``' part of it)."""
        leaves = torch.arange(len(self.trie.titles)) if leaves is None else leaves
        fed = self.fed_for(leaves)
        rows = []
        ids = self._encode(prompts)
        for lo in range(0, len(ids), self.batch_size):
            rows.append(self.cumulative(self.edge_logprobs(ids[lo:lo + self.batch_size], fed))
                        [:, self.leaf_node[leaves]])
        return torch.cat(rows)

    def bounds(self, prompt_ids: list[list[int]], depth: int) -> torch.Tensor:
        """[B, L] each title's log-probability up to ``depth`` tokens: an upper bound on its score."""
        fed = torch.nonzero(self.inner & (self.depth < depth)).squeeze(1)
        score = self.cumulative(self.edge_logprobs(prompt_ids, fed))
        full = self.depth[self.leaf_node]
        k = full.clamp(max=depth)  # the deepest scored node on each title's path
        inner = self.leaf_path.gather(1, (k - 1).clamp(min=0, max=self.leaf_path.shape[1] - 1)[:, None]).squeeze(1)
        return score[:, torch.where(k == full, self.leaf_node, inner)]

    def prior(self, prompt: str) -> torch.Tensor:
        """[L] log p(title | ``prompt``), the no-history prompt; computed once per prompt."""
        if prompt not in self.priors:
            self.priors[prompt] = self.exact([prompt])[0]
        return self.priors[prompt]

    def rank(self, prompts: Sequence[str], candidates: int, prefix_depth: int,
             prior: Sequence[torch.Tensor | None] | None = None,
             excluded: Sequence[Sequence[int]] | None = None) -> list[Ranking]:
        """Rank the titles for each prompt: bounds for all, exact scores for the best ``candidates``.

        ``prior``: per row, w * log p(title | no history) to subtract (None: none). ``excluded``:
        per row, leaf indices left out of the ranking (the history's titles)."""
        n = len(self.trie.titles)
        ids = self._encode(prompts)
        out: list[Ranking] = []
        for lo in range(0, len(ids), self.batch_size):
            batch = ids[lo:lo + self.batch_size]
            bound = self.bounds(batch, prefix_depth) if candidates < n else torch.zeros((len(batch), n))
            chosen_rows, shifts, tops = [], [], []
            for r in range(len(batch)):
                k = lo + r
                shift = prior[k] if prior is not None and prior[k] is not None else torch.zeros(n)
                upper = bound[r] - shift
                if excluded is not None and excluded[k]:
                    upper[torch.tensor(list(excluded[k]), dtype=torch.long)] = float("-inf")
                pool = int(torch.isfinite(upper).sum())
                order = torch.argsort(upper, descending=True, stable=True)
                take = min(candidates, pool)
                chosen_rows.append(order[:take])
                shifts.append(shift)
                tops.append(float(upper[order[take]]) if take < pool else float("-inf"))
            score = self.cumulative(self.edge_logprobs(batch, [self.fed_for(c) for c in chosen_rows]))
            for r, chosen in enumerate(chosen_rows):
                exact = score[r, self.leaf_node[chosen]] - shifts[r][chosen]
                best = torch.argsort(exact, descending=True, stable=True)
                leaves, scores = chosen[best], exact[best]
                certified = int((scores >= tops[r]).long().cumprod(0).sum())
                out.append(Ranking(leaves.tolist(), scores.tolist(), certified))
        return out
