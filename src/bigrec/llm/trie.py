"""A prefix trie over the catalogue titles as the model writes them, for constrained decoding.

The trie takes each title's token ids as given (:meth:`Trie.from_token_ids`): a layout
(:mod:`bigrec.llm.layouts`) says how its model writes a title and which token ends it. The
window layout's ids are :func:`response_ids`: the title tokenised exactly as training tokenises
a response (``bigrec.llm.sft_data``), the response text alone (the quoted title, plus a newline
for the D3 template), without special tokens, followed by EOS. The end token is part of every
path, so a title that is a prefix of another still ends in its own leaf. Each leaf holds the
ids of every catalogue item with that title.

Nodes are numbered in preorder (children by token id), so a node's subtree is a contiguous
range of node ids and of leaves. The edges are also kept as flat tensors sorted by
``parent * STRIDE + token``, which turns "child of (node, token)" for a whole batch of beams
into one ``searchsorted``: no Python loop per beam or per vocabulary entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bigrec.data.prompts import quote, response_text

STRIDE = 1 << 32  # edge key = parent * STRIDE + token; token ids stay below 2**32


def eos_id(tokenizer) -> int:
    """EOS, the end of every title of the window layout."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; constrained decoding ends every title with EOS")
    return int(tokenizer.eos_token_id)


def response_ids(tokenizer, title: str, template: str = "alpaca", context: str | None = None) -> list[int]:
    """Token ids of a title's response in prompt ``template`` (alpaca or d3), then EOS.

    By default the response text is tokenised alone, as ``bigrec.llm.sft_data`` and D3's training
    code build it. With ``context`` (the end of the prompt, e.g. ``"### Response:\n"``) it is
    tokenised after that text and the context's tokens are cut off, as for a model trained on
    prompt and response tokenised as one string; if the response changes how the context
    itself tokenises, no boundary exists and this raises ``ValueError``.
    """
    text = response_text(quote(title), template)
    if context is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        head = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context + text, add_special_tokens=False)["input_ids"]
        if ids[:len(head)] != head:
            raise ValueError(f"{text!r} after {context!r} changes the context's tokens: the response does not "
                             "start at a token boundary; build the trie without context")
        ids = ids[len(head):]
    return list(ids) + [tokenizer.eos_token_id]


@dataclass
class Trie:
    """Catalogue titles as token paths. Node 0 is the root; node ``dead`` has no children."""

    titles: list[str]  # distinct titles, by leaf index (preorder)
    leaf_items: list[list[int]]  # item ids with that title, by leaf index
    paths: list[list[int]]  # token path of each leaf, the end token (eos_token_id) last
    num_items: int
    eos_token_id: int  # the token that ends every path: the layout's end token (EOS, the timeline separator)
    # tensors (CPU; see to())
    ptr: torch.Tensor  # [M + 2] CSR offsets into the edge arrays; node M is `dead`
    edge_key: torch.Tensor  # [E] parent * STRIDE + token, ascending
    edge_token: torch.Tensor  # [E]
    edge_child: torch.Tensor  # [E]
    edge_parent: torch.Tensor  # [E]
    node_depth: torch.Tensor  # [M + 1]
    node_leaf: torch.Tensor  # [M + 1] leaf index, -1 for inner nodes
    leaf_node: torch.Tensor  # [L] node id of each leaf
    item_leaf: torch.Tensor  # [N] leaf index of each item (-1 if the item's title is not in the trie)
    subtree_end: torch.Tensor  # [M + 1] a node's subtree is node ids [n, subtree_end[n])
    children: list[dict[int, int]] = field(repr=False)  # token -> child, for walking finished sequences
    leaf_of: list[int] = field(repr=False)  # node_leaf as a list
    _on: dict = field(default_factory=dict, repr=False)

    @property
    def num_nodes(self) -> int:
        return len(self.children)

    def leaves_of(self, item_ids: Sequence[int]) -> list[int]:
        """The leaves of these items' titles, sorted, each once (ids outside the catalogue, and items
        whose title is not in the trie, have none)."""
        return sorted({leaf for i in item_ids if 0 <= int(i) < self.num_items
                       if (leaf := int(self.item_leaf[int(i)])) >= 0})

    @property
    def dead(self) -> int:
        """The node of any prefix that left the trie (or ended): no token is allowed after it."""
        return self.num_nodes

    @property
    def max_depth(self) -> int:
        """Tokens in the longest path (EOS included): enough ``max_new_tokens`` for every title."""
        return max(len(p) for p in self.paths)

    @classmethod
    def build(cls, tokenizer, titles: Sequence[str], template: str = "alpaca", context: str | None = None) -> Trie:
        """The window layout's trie in prompt ``template``: ``titles`` as :func:`response_ids` (with ``context``)."""
        return cls.from_token_ids(titles, lambda title: response_ids(tokenizer, title, template, context),
                                  eos_id(tokenizer))

    @classmethod
    def from_token_ids(cls, titles: Sequence[str], ids_of: Callable[[str], Sequence[int]], end_token: int) -> Trie:
        """Trie over ``titles`` (indexed by item id; equal titles share one leaf), each the path
        ``ids_of(title)``, which ends with ``end_token`` (a layout's ``response_ids`` and ``end_token``)."""
        ids_by_title: dict[str, list[int]] = {}
        for item_id, title in enumerate(titles):
            ids_by_title.setdefault(title, []).append(item_id)
        if not ids_by_title:
            raise ValueError("cannot build a trie over an empty catalogue")
        nested: dict = {}
        leaf_key = object()  # marks the end of a path inside the nested dicts
        for title, ids in ids_by_title.items():
            node = nested
            path = list(ids_of(title))
            if not path or path[-1] != end_token:
                raise ValueError(f"the token ids of {title!r} do not end with the end token {end_token}")
            for tok in path:
                node = node.setdefault(tok, {})
            node[leaf_key] = (title, ids)
        # Preorder numbering, children in token order.
        children: list[dict[int, int]] = []
        depth: list[int] = []
        end: list[int] = []
        node_leaf: list[int] = []
        leaves: list[tuple[str, list[int], list[int], int]] = []  # title, ids, path, node
        edges: list[tuple[int, int, int]] = []  # parent, token, child
        stack = [(nested, -1, -1, [])]
        while stack:
            sub, parent, tok, path = stack.pop()
            nid = len(children)
            children.append({})
            depth.append(len(path))
            end.append(-1)
            node_leaf.append(-1)
            if parent >= 0:
                children[parent][tok] = nid
                edges.append((parent, tok, nid))
            if leaf_key in sub:
                title, ids = sub[leaf_key]
                node_leaf[nid] = len(leaves)
                leaves.append((title, ids, path, nid))
            for t in sorted((k for k in sub if k is not leaf_key), reverse=True):
                stack.append((sub[t], nid, t, path + [t]))
        # Preorder: a subtree ends where the next node with depth <= its own starts.
        m = len(children)
        open_nodes: list[int] = []
        for nid in range(m):
            while open_nodes and depth[open_nodes[-1]] >= depth[nid]:
                end[open_nodes.pop()] = nid
            open_nodes.append(nid)
        for nid in open_nodes:
            end[nid] = m
        item_leaf = torch.full((len(titles),), -1, dtype=torch.long)
        for li, (_, ids, _, _) in enumerate(leaves):
            item_leaf[ids] = li
        edges.sort()
        e = torch.tensor(edges, dtype=torch.long).reshape(-1, 3)
        counts = torch.bincount(e[:, 0], minlength=m + 1)
        ptr = torch.zeros(m + 2, dtype=torch.long)
        ptr[1:] = torch.cumsum(counts, 0)
        return cls(
            titles=[t for t, _, _, _ in leaves], leaf_items=[ids for _, ids, _, _ in leaves],
            paths=[p for _, _, p, _ in leaves], num_items=len(titles), eos_token_id=end_token,
            ptr=ptr, edge_key=e[:, 0] * STRIDE + e[:, 1], edge_token=e[:, 1].clone(),
            edge_child=e[:, 2].clone(), edge_parent=e[:, 0].clone(),
            node_depth=torch.tensor(depth + [0], dtype=torch.long),
            node_leaf=torch.tensor(node_leaf + [-1], dtype=torch.long),
            leaf_node=torch.tensor([n for _, _, _, n in leaves], dtype=torch.long),
            item_leaf=item_leaf, subtree_end=torch.tensor(end + [m + 1], dtype=torch.long), children=children,
            leaf_of=node_leaf)

    def to(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The lookup tensors on ``device`` (moved once, then cached)."""
        device = torch.device(device)
        if device not in self._on:
            names = ("ptr", "edge_key", "edge_token", "edge_child", "edge_parent", "node_depth", "leaf_node",
                     "item_leaf")
            self._on[device] = {n: getattr(self, n).to(device) for n in names}
        return self._on[device]

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each ``(node, token)`` pair; ``dead`` where the token is no child (vectorised)."""
        t = self.to(nodes.device)
        key = nodes * STRIDE + tokens
        idx = torch.searchsorted(t["edge_key"], key).clamp_(max=t["edge_key"].numel() - 1)
        found = t["edge_key"][idx] == key
        return torch.where(found, t["edge_child"][idx], torch.full_like(nodes, self.dead))

    def walk(self, tokens: Sequence[int]) -> tuple[int | None, list[int]]:
        """(leaf index, nodes entered) of a generated sequence up to its EOS; leaf None if it is no title.

        Every node but the root has one incoming edge, so the nodes entered name the tokens' edges.
        """
        node, entered = 0, []
        for tok in tokens:
            node = self.children[node].get(int(tok), -1)
            if node < 0:
                return None, entered
            entered.append(node)
            if self.leaf_of[node] >= 0:
                break
        leaf = self.leaf_of[node] if entered else -1
        return (leaf if leaf >= 0 else None), entered

    def node_values(self, item_scores: torch.Tensor) -> torch.Tensor:
        """[R, M + 1] max of ``item_scores`` [R, N] over the items under each node (``dead``: 0).

        Leaves take the max over their items (duplicate titles), inner nodes the max over their
        children, one tree level at a time from the deepest: a handful of scatter operations.
        """
        t = self.to(item_scores.device)
        r, m = item_scores.shape[0], self.num_nodes
        values = torch.full((r, m + 1), float("-inf"), dtype=item_scores.dtype, device=item_scores.device)
        present = t["item_leaf"] >= 0
        leaf_nodes = t["leaf_node"][t["item_leaf"][present]]
        values.scatter_reduce_(1, leaf_nodes.expand(r, -1), item_scores[:, present], "amax")
        child_depth = t["node_depth"][t["edge_child"]]
        for d in range(int(child_depth.max()), 0, -1):
            level = child_depth == d
            parents, kids = t["edge_parent"][level], t["edge_child"][level]
            values.scatter_reduce_(1, parents.expand(r, -1), values[:, kids], "amax")
        values[:, m] = 0.0
        return values
