"""Causal-LM loss from logits computed only where a token is predicted that carries a label.

With the loss on the response only, a BIGRec example of ~200 tokens has ~15 labelled
positions, yet a plain forward pass computes [batch, length, vocab] logits: for SmolLM2-135M
(vocabulary 49,152, width 576) the LM head is about a fifth of the FLOPs and its logits, their
float32 copy and their gradient are most of the activation memory. A forward pre-hook on the
LM head hands it only the hidden states of labelled positions, and :meth:`LabelledLogits.loss`
takes the same token-mean cross-entropy the model's own loss takes. Going through the model's
forward (not around it) keeps DDP and DeepSpeed hooks working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bigrec.llm.sft_data import IGNORE_INDEX


class LabelledLogits:
    """Selects the LM head's input rows while a batch is in flight; computes the loss on them."""

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to select rows for")
        self.keep: torch.Tensor | None = None  # [B, T] positions whose next token carries a label
        self.handle = head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.keep is None:
            return None
        hidden = args[0]  # [B, T', D]; T' = T unless the model already cut the sequence
        if hidden.shape[:2] != self.keep.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not match the labels {tuple(self.keep.shape)}")
        return (hidden[self.keep.to(hidden.device)], *args[1:])  # [K, D]

    @contextmanager
    def positions(self, labels: torch.Tensor) -> Iterator[None]:
        """Within the block, the LM head sees only positions t with ``labels[:, t + 1]`` set."""
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        self.keep = keep
        try:
            yield
        finally:
            self.keep = None

    @staticmethod
    def loss(outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the selected logits [K, V] against the shifted labels, as
        ``transformers``' causal-LM loss: summed over tokens, divided by the tokens of the whole
        accumulated batch when the Trainer gives their number, else averaged."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        shifted = labels[:, 1:]
        targets = shifted[shifted != IGNORE_INDEX].to(logits.device)
        if logits.dim() != 2 or logits.shape[0] != targets.numel():
            raise RuntimeError(f"expected logits for {targets.numel()} labelled positions, got {tuple(logits.shape)}")
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is None:
            return total / max(1, targets.numel())
        return total / torch.as_tensor(num_items_in_batch, device=total.device)

    def remove(self) -> None:
        self.handle.remove()
