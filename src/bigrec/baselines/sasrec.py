"""SASRec (Kang & McAuley, 2018): causal self-attention over the last ``max_len`` item ids.

Item ids ``0..N-1`` are embedded at ``id + 1``; embedding row 0 is padding. Histories are
left-padded, so the last position always holds the latest item and its output scores the
next one: the dot product with every item embedding (shared input/output embeddings, as in
the paper). Blocks are pre-norm ``nn.TransformerEncoderLayer``s with a point-wise feed-forward
of width ``hidden``, followed by a final layer norm.

A saved model is ``model.safetensors`` (the weights) plus ``model.json`` (the architecture and
the catalogue it was trained on), so ``SASRec.from_dir`` rebuilds it from the folder alone.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from bigrec.baselines.data import PAD
from bigrec.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)


@dataclass
class SASRecConfig:
    num_items: int
    max_len: int = 10
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.2


class SASRec(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.item_emb = nn.Embedding(config.num_items + 1, h, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, h)
        self.drop = nn.Dropout(config.dropout)
        block = nn.TransformerEncoderLayer(h, config.heads, dim_feedforward=h, dropout=config.dropout,
                                           activation="relu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        nn.init.normal_(self.item_emb.weight, std=h ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=h ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @property
    def item_vectors(self) -> torch.Tensor:
        """Output embeddings [N, H] of the catalogue (padding row excluded)."""
        return self.item_emb.weight[1:]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, H] for left-padded item ids [B, L] (``PAD`` = -1)."""
        tokens = seq + 1  # [B, L], 0 = padding
        live = tokens != 0  # [B, L]
        length = tokens.shape[1]
        # No sqrt(hidden) scaling: with tied embeddings a scaled input dominates the residual stream
        # and the last item then scores itself first (74% of ml-100k test rows; all-rank exposes it).
        x = self.item_emb(tokens) + self.pos_emb.weight[:length]
        x = self.drop(x) * live.unsqueeze(-1)
        # A query sees earlier real items and itself, so no row of the mask is empty (no NaN).
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()  # [L, L]
        eye = torch.eye(length, dtype=torch.bool, device=seq.device)
        allowed = (causal & live.unsqueeze(1)) | eye  # [B, L, L]
        mask = ~allowed.repeat_interleave(self.config.heads, dim=0)  # [B*heads, L, L], True = blocked
        x = self.blocks(x, mask=mask)
        return self.norm(x) * live.unsqueeze(-1)

    def last_hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """State [B, H] after the last position, which predicts the next item."""
        short = self.config.max_len - seq.shape[1]
        if short > 0:  # positions count from the left of a full window, as in training
            seq = F.pad(seq, (short, 0), value=PAD)
        return self.forward(seq[:, -self.config.max_len:])[:, -1]

    @torch.no_grad()
    def score(self, histories: list[list[int]] | torch.Tensor) -> torch.Tensor:
        """Scores [B, N] of every catalogue item for each history (latest item last; higher = better)."""
        was_training = self.training
        self.eval()
        seq = histories if isinstance(histories, torch.Tensor) else pad_histories(histories, self.config.max_len)
        device = self.item_emb.weight.device
        scores = self.last_hidden(seq.to(device)) @ self.item_vectors.T
        self.train(was_training)
        return scores

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        out_dir = Path(out_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        write_json(out_dir / "model.json", {"model": "sasrec", "config": asdict(self.config), **(extra or {})})

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> SASRec:
        """Rebuild a model saved by ``bigrec baseline --model sasrec`` (``model.json`` + weights)."""
        path = Path(path)
        meta = read_json(path / "model.json")
        if meta.get("model") != "sasrec":
            raise ValueError(f"{path}/model.json: not a SASRec model (model={meta.get('model')!r})")
        model = cls(SASRecConfig(**meta["config"]))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(device).eval()


def pad_histories(histories: list[list[int]], max_len: int) -> torch.Tensor:
    """Left-pad (and cut to the last ``max_len``) item-id lists into [B, max_len]."""
    out = torch.full((len(histories), max_len), PAD, dtype=torch.long)
    for i, items in enumerate(histories):
        items = list(items)[-max_len:]
        if items:
            out[i, max_len - len(items):] = torch.tensor(items, dtype=torch.long)
    return out


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def batch_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, loss: str, negatives: int,
               generator: torch.Generator) -> torch.Tensor:
    """Next-item loss over the positions with a target (``targets != PAD``)."""
    hidden = model(inputs)  # [B, L, H]
    keep = targets != PAD
    h, t = hidden[keep], targets[keep]  # [M, H], [M]
    items = model.item_vectors  # [N, H]
    if loss == "ce":
        return F.cross_entropy(h @ items.T, t)  # full softmax over the catalogue
    neg = torch.randint(0, items.shape[0], (t.shape[0], negatives), generator=generator).to(t.device)
    pos_logit = (h * items[t]).sum(-1)  # [M]
    neg_logit = torch.einsum("mh,mkh->mk", h, items[neg])  # [M, K]
    return (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
            + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
            .sum(1).mean())


def fit(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor, validate: Callable[[SASRec], float], *,
        lr: float, batch_size: int, epochs: int, patience: int, loss: str = "ce", negatives: int = 1,
        seed: int = 42) -> FitResult:
    """Adam on windows [W, L], early stopping on ``validate(model)``; the best state is restored."""
    device = model.item_emb.weight.device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    best = FitResult(best_epoch=0, best_metric=-1.0, seconds=0.0)
    best_state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, steps = 0.0, 0
        bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {epoch}", leave=False, unit="batch")
        for lo in bar:
            idx = order[lo:lo + batch_size]
            value = batch_loss(model, inputs[idx].to(device), targets[idx].to(device), loss, negatives, generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total, steps = total + value.item(), steps + 1
            bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
        metric = validate(model)
        elapsed = time.perf_counter() - start
        best.history.append({"epoch": epoch, "loss": total / max(steps, 1), "valid_ndcg10": metric,
                             "seconds": round(elapsed, 2)})
        log.info("epoch %d: loss %.4f, valid NDCG@10 %.4f (%.0fs)", epoch, total / max(steps, 1), metric, elapsed)
        if metric > best.best_metric:
            best.best_epoch, best.best_metric = epoch, metric
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best.best_epoch >= patience:
            log.info("no improvement for %d epochs; best epoch %d", patience, best.best_epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    best.seconds = time.perf_counter() - start
    return best
