"""Likelihood ranking: every catalogue title scored by the model's own log-probability.

A title's score is the sum of its tokens' log-probabilities given the prompt (EOS, or the
timeline separator, included; no length normalisation), as D3 and MiniOneRec rank items. Every
item gets its own score, so the list cannot collapse onto a few titles the way beam search does.

Titles share prefixes, so they are scored over the catalogue's trie (:class:`bigrec.llm.trie.Trie`)
with tree attention: the trie's tokens go through the model in one sequence after the prompt,
each attending to the prompt and to its own ancestors only (a 4D mask), at the position it would
have right after the prompt. One forward then gives the next-token distribution at every trie node.

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

from bigrec.llm.kv_cache import decoder_of
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
                 chunk_tokens: int = 2048, batch_size: int = 4):
        self.model, self.tokenizer, self.trie = model, tokenizer, trie
        self.autocast, self.chunk_tokens, self.batch_size = autocast, chunk_tokens, batch_size
        self.body = decoder_of(model)
        self.head = model.get_output_embeddings()
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

    @torch.no_grad()
    def edge_logprobs(self, prompt_ids: list[list[int]], fed: torch.Tensor) -> torch.Tensor:
        """[B, M] log p(node's token | prompt, node's ancestors) for every node whose parent is the
        root or in ``fed`` (NaN elsewhere). ``fed``: inner nodes, closed under ancestors."""
        fed = torch.sort(fed).values
        b, m = len(prompt_ids), self.trie.num_nodes
        out = torch.full((b, m), float("nan"))
        if fed.numel() == 0:
            self._pass(prompt_ids, fed, fed, out, root=True)
            return out
        for lo in range(0, fed.numel(), self.chunk_tokens):
            own = fed[lo:lo + self.chunk_tokens]
            context = torch.tensor(self._ancestors(int(own[0])), dtype=torch.long)
            self._pass(prompt_ids, torch.cat([context, own]), own, out, root=lo == 0)
        return out

    def _pass(self, prompt_ids: list[list[int]], nodes: torch.Tensor, own: torch.Tensor, out: torch.Tensor,
              root: bool) -> None:
        """One forward of the prompts and ``nodes`` (sorted, preorder); writes the log-probs of
        the edges out of ``own`` (and, with ``root``, out of the root) into ``out``."""
        device = self.model.device
        b, c = len(prompt_ids), nodes.numel()
        p = max(len(ids) for ids in prompt_ids)
        w = p + c
        lengths = torch.tensor([len(ids) for ids in prompt_ids])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, w), pad, dtype=torch.long)
        real = torch.zeros((b, p), dtype=torch.bool)
        for r, row in enumerate(prompt_ids):
            ids[r, p - len(row):p] = torch.tensor(row)
            real[r, p - len(row):] = True
        ids[:, p:] = self.node_token[nodes]
        positions = torch.zeros((b, w), dtype=torch.long)
        positions[:, :p] = (real.long().cumsum(1) - 1).clamp(min=0)
        positions[:, p:] = lengths[:, None] + self.depth[nodes][None, :] - 1
        allowed = torch.zeros((b, w, w), dtype=torch.bool)
        allowed[:, :p, :p] = torch.tril(torch.ones(p, p, dtype=torch.bool)) & real[:, None, :]
        allowed[:, p:, :p] = real[:, None, :]
        ancestor = (nodes[None, :] <= nodes[:, None]) & (nodes[:, None] < self.end[nodes][None, :])
        allowed[:, p:, p:] = ancestor
        allowed |= torch.eye(w, dtype=torch.bool)  # padding attends to itself: no row is all masked
        weights = next(self.model.parameters()).dtype
        dtype = self.autocast or weights
        if getattr(self.model.config, "_attn_implementation", None) == "sdpa":  # SDPA takes a boolean mask
            mask = allowed[:, None]
        else:  # eager attention adds the mask to the scores
            mask = torch.zeros((b, 1, w, w), dtype=weights).masked_fill_(~allowed[:, None], torch.finfo(weights).min)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != weights):
            hidden = self.body(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=positions.to(device), use_cache=False).last_hidden_state
        # Edges out of the root (the last prompt token) and out of each own node.
        index = {int(n): p + i for i, n in enumerate(nodes.tolist())}
        t = self.trie
        parents = torch.cat([torch.tensor([0]), own])
        sources = torch.tensor([p - 1] + [index[int(n)] for n in own.tolist()])
        lo, hi = t.ptr[parents], t.ptr[parents + 1]
        counts = hi - lo
        edge = torch.repeat_interleave(lo, counts) + (torch.arange(int(counts.sum()))
                                                      - torch.repeat_interleave(counts.cumsum(0) - counts, counts))
        src = torch.repeat_interleave(sources, counts)
        tokens, children = t.edge_token[edge], t.edge_child[edge]
        if not root:
            keep = src != p - 1
            src, tokens, children = src[keep], tokens[keep], children[keep]
        wanted = torch.unique(src)
        slot = torch.searchsorted(wanted, src)
        for r in range(b):
            logp = torch.cat([torch.log_softmax(self.head(hidden[r, wanted[i:i + 256].to(device)]).float(), -1)
                              for i in range(0, wanted.numel(), 256)])
            out[r, children] = logp[slot, tokens.to(logp.device)].cpu()

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
        """[B, L] (or [B, len(leaves)]) exact title scores: the whole (or ``leaves``') trie in one pass."""
        leaves = torch.arange(len(self.trie.titles)) if leaves is None else leaves
        fed = torch.unique(self.leaf_path[leaves]).clamp(min=0)
        fed = fed[self.inner[fed]]
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
            for r, row_ids in enumerate(batch):
                k = lo + r
                shift = prior[k] if prior is not None and prior[k] is not None else torch.zeros(n)
                upper = bound[r] - shift
                if excluded is not None and excluded[k]:
                    upper[torch.tensor(list(excluded[k]), dtype=torch.long)] = float("-inf")
                pool = int(torch.isfinite(upper).sum())
                take = min(candidates, pool)
                order = torch.argsort(upper, descending=True, stable=True)
                chosen, rest = order[:take], order[take:pool]
                fed = torch.unique(self.leaf_path[chosen]).clamp(min=0)
                fed = fed[self.inner[fed]]
                exact = self.cumulative(self.edge_logprobs([row_ids], fed))[0, self.leaf_node[chosen]] - shift[chosen]
                best = torch.argsort(exact, descending=True, stable=True)
                leaves, scores = chosen[best], exact[best]
                top_rest = float(upper[rest[0]]) if rest.numel() else float("-inf")
                certified = int((scores >= top_rest).long().cumprod(0).sum())
                out.append(Ranking(leaves.tolist(), scores.tolist(), certified))
        return out
