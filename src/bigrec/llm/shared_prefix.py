"""A micro-batch's common prompt prefix through the model once, not once per row.

Window rows open with the same instruction: on ml-100k 72 of a median 202 tokens. A padded
micro-batch of 8 runs those positions 8 times, forward and backward. Under causal attention a
position's keys and values depend only on the tokens before it, so the prefix's cache is the same
in every row: it is computed for one row, repeated for the batch (autograd sums the rows'
gradients back into it), and the rest of each row attends to it. The loss is the plain path's;
with LoRA dropout the prefix draws one dropout mask for the batch instead of one per row.

The prefix stops before the first position whose next token carries a label, so the loss's
positions all stay in the part that runs per row (with the loss on the prompt too, nothing is
shared).
"""

from __future__ import annotations

import torch

from bigrec.llm.kv_cache import cache_kwarg, repeated_prefix
from bigrec.llm.sft_data import IGNORE_INDEX

MIN_SHARED = 16  # fewer common tokens are not worth a second call of the model


def shared_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  minimum: int = MIN_SHARED) -> int:
    """Tokens every row of a right-padded batch [B, T] opens with, attended and before any labelled
    position's predecessor; 0 where a batch of one row or fewer than ``minimum`` tokens."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= (attention_mask == 1).all(0)
    length = min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)  # each row keeps a token of its own
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if labelled.numel():
        length = min(length, int(labelled[0]) - 1)  # position j - 1 predicts label j: it runs per row
    return length if length >= minimum else 0


def split_batch(model, inputs: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``inputs`` with their first ``length`` tokens run once through ``model``'s body: the rest of
    each row, its labels, and the prefix's cache repeated for the batch (the attention mask stays
    whole, since it covers the cache too)."""
    ids = inputs["input_ids"]
    cache = repeated_prefix(model, ids.shape[0], input_ids=ids[:1, :length])
    return {**inputs, "input_ids": ids[:, length:], "labels": inputs["labels"][:, length:],
            cache_kwarg(model): cache}
