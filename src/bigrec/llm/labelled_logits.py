"""Causal-LM loss from logits computed only where a token is predicted that carries a label.

With the loss on the response only, a BIGRec example of ~200 tokens has ~15 labelled
positions, yet a plain forward pass computes [batch, length, vocab] logits: for SmolLM2-135M
(vocabulary 49,152, width 576) the LM head is about a fifth of the FLOPs and its logits, their
float32 copy and their gradient are most of the activation memory. A forward pre-hook on the
LM head hands it only the hidden states of labelled positions, and :meth:`LabelledLogits.loss`
takes the same token-mean cross-entropy the model's own loss takes. Going through the model's
forward (not around it) keeps DDP and DeepSpeed hooks working.

With ``chunk`` rows, the head is handed no rows at all and the loss computes the selected
positions' logits a chunk at a time from the head's weight (:func:`chunked_cross_entropy`), so
that neither the [K, vocabulary] logits nor their float32 copies and gradients are ever made:
on a CPU each of those is a fresh ``mmap`` the kernel must zero-fill, every micro-batch. This
path is taken only where a probe shows the model's logits are exactly its head's product (no
bias, scale or soft-cap after it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bigrec.llm.sft_data import IGNORE_INDEX

log = logging.getLogger(__name__)
ADD_BLOCK = 2048  # vocabulary rows per float32 accumulation of the head's gradient


class LabelledLogits:
    """Selects the LM head's input rows while a batch is in flight; computes the loss on them,
    ``chunk`` rows of logits at a time where the head allows it (0 = all at once)."""

    def __init__(self, model: torch.nn.Module, chunk: int = 0):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to select rows for")
        self.head = head
        self.chunk = chunk if chunk > 0 and plain_linear_head(model, head) else 0
        self.keep: torch.Tensor | None = None  # [B, T] positions whose next token carries a label
        self.selected: torch.Tensor | None = None  # [K, D] the head's input rows, when chunked
        self.dtype: torch.dtype | None = None  # the dtype the head's product runs in (autocast's)
        self.workspace = Workspace()
        self.handle = head.register_forward_pre_hook(self._select)

    def _select(self, module, args):
        if self.keep is None:
            return None
        hidden = args[0]  # [B, T', D]; T' = T unless the model already cut the sequence
        if hidden.shape[:2] != self.keep.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not match the labels {tuple(self.keep.shape)}")
        selected = hidden[self.keep.to(hidden.device)]  # [K, D]
        if not self.chunk:
            return (selected, *args[1:])
        kind = selected.device.type
        self.dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.head.weight.dtype
        self.selected = selected
        return (selected[:0], *args[1:])  # the head makes [0, V] logits; the loss makes the rest

    @contextmanager
    def positions(self, labels: torch.Tensor) -> Iterator[None]:
        """Within the block, the LM head sees only positions t with ``labels[:, t + 1]`` set."""
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        self.keep = keep
        try:
            yield
        finally:
            self.keep = self.selected = None

    def loss(self, outputs, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the selected logits [K, V] against the shifted labels, as
        ``transformers``' causal-LM loss: summed over tokens, divided by the tokens of the whole
        accumulated batch when the Trainer gives their number, else averaged."""
        shifted = labels[:, 1:]
        targets = shifted[shifted != IGNORE_INDEX]
        if self.selected is not None:
            hidden, self.selected = self.selected, None
            total = chunked_cross_entropy(hidden, self.head.weight, targets.to(hidden.device), self.chunk, self.dtype,
                                          self.workspace)
        else:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            targets = targets.to(logits.device)
            if logits.dim() != 2 or logits.shape[0] != targets.numel():
                raise RuntimeError(f"expected logits for {targets.numel()} labelled positions, got {tuple(logits.shape)}")
            total = F.cross_entropy(logits.float(), targets, reduction="sum")
        if num_items_in_batch is None:
            return total / max(1, targets.numel())
        return total / torch.as_tensor(num_items_in_batch, device=total.device)

    def remove(self) -> None:
        self.handle.remove()


class Workspace:
    """Buffers kept between calls, so that the chunked loss asks the allocator for no fresh large
    blocks: on a CPU each is a new ``mmap`` that the kernel zero-fills page by page."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        size, buffer = math.prod(shape), self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.device != device or buffer.numel() < size:
            buffer = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size].view(shape)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, ``chunk`` rows at a time.

    Each chunk's logits are made in ``dtype`` (as autocast's linear makes them), turned into the
    loss in float32 and into the gradient of their softmax, all in the workspace's buffers: no
    [K, vocabulary] tensor is ever allocated. The input gradients are computed in the forward and
    scaled by the output's gradient in the backward, so the head's product runs three times, as
    it would unfused. The weight's gradient is summed over chunks in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype, workspace: Workspace):
        grad_hidden, grad_weight = ctx.needs_input_grad[:2]
        device, (rows, width), vocab = hidden.device, hidden.shape, weight.shape[0]
        h_all = hidden.to(dtype)
        w = weight if weight.dtype == dtype else workspace.get("weight", weight.shape, dtype, device).copy_(weight)
        total = torch.zeros((), dtype=torch.float32, device=device)
        d_hidden = torch.empty_like(h_all) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if grad_weight else None
        for start in range(0, rows, chunk):
            h, t = h_all[start:start + chunk], targets[start:start + chunk]
            n = t.numel()
            products = torch.mm(h, w.T, out=workspace.get("products", (n, vocab), dtype, device))
            logits = workspace.get("logits", (n, vocab), torch.float32, device).copy_(products)
            # log-sum-exp by hand, in place: torch.logsumexp allocates a [n, V] temporary
            picked = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=-1)
            sums = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
            total += (peak + sums.log() - picked).sum()
            if d_hidden is None and d_weight is None:
                continue
            soft = logits.div_(sums[:, None])  # the softmax, in the logits' place
            soft[torch.arange(n, device=device), t] -= 1
            d_logits = products.copy_(soft)
            if d_hidden is not None:
                torch.mm(d_logits, w, out=d_hidden[start:start + chunk])
            if d_weight is not None:
                product = torch.mm(d_logits.T, h, out=workspace.get("d_weight", (vocab, width), dtype, device))
                for block in range(0, vocab, ADD_BLOCK):  # a whole-matrix mixed-dtype add converts into a fresh block
                    d_weight[block:block + ADD_BLOCK] += product[block:block + ADD_BLOCK]
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden, d_weight = ctx.saved_tensors
        return (None if d_hidden is None else (d_hidden * grad_total).to(ctx.hidden_dtype),
                None if d_weight is None else d_weight.mul_(grad_total),
                None, None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                          dtype: torch.dtype | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T`` (made in ``dtype``, default the
    weight's) against ``targets``, ``chunk`` rows of logits at a time; differentiable in both inputs."""
    if hidden.shape[0] != targets.numel():
        raise RuntimeError(f"expected {targets.numel()} hidden rows for the labelled positions, got {hidden.shape[0]}")
    if not torch.is_grad_enabled():  # evaluation: no gradients to prepare in the forward
        hidden, weight = hidden.detach(), weight.detach()
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, max(1, chunk), dtype or weight.dtype,
                                      workspace or Workspace())

def plain_linear_head(model: torch.nn.Module, head: torch.nn.Module) -> bool:
    """Whether the model's logits are exactly the product of the last hidden states with the head's
    weight (no bias, no hook on the head, no scale or soft-cap after it), checked on a four-token probe. A head
    whose weight is not materialised here (DeepSpeed ZeRO-3 shards) does not qualify."""
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or weight is None or weight.dim() != 2 \
            or weight.numel() == 0:
        return False
    seen = {}
    handle = head.register_forward_hook(lambda module, args, output: seen.update(hidden=args[0], logits=output))
    training = model.training
    try:
        model.train(False)
        with torch.no_grad():
            ids = (torch.arange(4, device=weight.device) % weight.shape[0])[None]
            logits = model(input_ids=ids, use_cache=False).logits
    except Exception as error:  # noqa: BLE001 - any failure means: keep the head's own path
        log.debug("LM head probe failed (%s); logits stay unchunked", error)
        return False
    finally:
        handle.remove()
        model.train(training)
    head_logits = seen.get("logits")
    return head_logits is not None and logits.shape == head_logits.shape \
        and torch.equal(logits.to(head_logits.dtype), head_logits) \
        and torch.equal(head_logits, F.linear(seen["hidden"], weight))
