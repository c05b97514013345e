"""Popularity baseline: rank every item by how often it is a target in the training split.

We count ``item_id`` over the rows of ``train.csv``: each training interaction that is some
row's target counts once. The first items of each user's first row (history only) are not
counted, so every count is one training example. ``bigrec evaluate``'s popularity re-weighting
should use :func:`train_counts` too, so that both read the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from bigrec.io import atomic_path, read_json, write_json


def item_counts(targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """Counts [N] (float32) of each item id among ``targets``."""
    return torch.bincount(targets.long(), minlength=num_items).float()


def train_counts(data_dir: str | Path, num_items: int) -> torch.Tensor:
    """Counts [N] of each item among the targets of ``<data_dir>/train.csv``."""
    path = Path(data_dir) / "train.csv"
    if not path.is_file():
        raise FileNotFoundError(f"prepared split not found: {path}")
    ids = pd.read_csv(path, usecols=["item_id"])["item_id"].to_numpy(dtype=np.int64)
    return item_counts(torch.tensor(ids), num_items)


class Popularity:
    """Scores every history the same way: the item's training count."""

    def __init__(self, counts: torch.Tensor) -> None:
        self.counts = counts.float()  # [N]

    def score(self, histories: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """Scores [B, N] for a batch of histories (ignored: popularity is not personal)."""
        return self.counts.unsqueeze(0).expand(len(histories), -1)

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        """``model.safetensors`` (tensor ``counts``) and ``model.json``, like a saved SASRec."""
        out_dir = Path(out_dir)
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file({"counts": self.counts.contiguous()}, str(tmp))
        write_json(out_dir / "model.json", {"model": "popularity", "num_items": len(self.counts), **(extra or {})})

    @classmethod
    def from_dir(cls, path: str | Path) -> Popularity:
        path = Path(path)
        meta = read_json(path / "model.json")
        if meta.get("model") != "popularity":
            raise ValueError(f"{path}/model.json: not a popularity model (model={meta.get('model')!r})")
        return cls(load_file(str(path / "model.safetensors"))["counts"])
