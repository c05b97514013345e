"""Per-row score matrices of a conventional model, aligned to result rows by row identity.

``bigrec baseline`` writes one file per split (``OUT/scores/<split>.safetensors``) and
``bigrec evaluate --ci_scores`` reads them to re-weight BIGRec's distances. A matrix is only
usable if its rows are the same examples as the rows being evaluated, so alignment is checked,
never assumed.

File format (safetensors; nothing is ever pickled):

- tensor ``scores`` [R, N]: one row per example, one column per catalogue id; higher is
  better. float16 for the full ``valid``/``test`` splits (ml-1m's test split is ~100k x 3.7k),
  float32 for the ``*_5000`` samples.
- tensor ``row`` [R] int64: the example's 0-based row in the prepared ``<split>.csv``.
- tensor ``item_id`` [R] int64: the example's target id.
- metadata ``format`` = ``bigrec-scores/1``, ``split`` (e.g. ``test_5000``) and ``user_ids``
  (JSON list, one per row).

A plain ``.npy`` matrix [R, N] is also accepted (``allow_pickle=False``): its row ``i`` is
taken to be row ``i`` of the prepared split CSV, which cannot be checked beyond the shape.

API: ``save_scores(path, scores, rows, item_ids, user_ids, split)``, ``load_scores(path)`` ->
:class:`ScoreMatrix`, and ``ScoreMatrix.align(result_rows)`` -> float32 [len(result_rows), N]
in the order of the result rows (dicts with ``row``, ``user_id`` and ``item_id``, as in the
prepared instruction JSON); a row that is missing or whose user or target differs raises
``ValueError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigrec.io import InputError, atomic_path

if TYPE_CHECKING:
    from bigrec.evaluation.results import Results

FORMAT = "bigrec-scores/1"


@dataclass
class ScoreMatrix:
    """Scores [R, N] and, for safetensors files, the identity of each row."""

    scores: torch.Tensor  # [R, N]
    rows: torch.Tensor | None = None  # [R] prepared-CSV row of each matrix row; None for .npy
    item_ids: torch.Tensor | None = None  # [R]
    user_ids: list | None = None  # [R]
    split: str | None = None
    source: str = ""
    _index: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return int(self.scores.shape[1])

    def align(self, result_rows: Sequence[dict]) -> torch.Tensor:
        """Scores [len(result_rows), N] (float32) in the order of ``result_rows``."""
        picks = []
        for k, res in enumerate(result_rows):
            if "row" not in res:
                raise InputError(f"{self.source}: result row {k} has no 'row' key; cannot align scores")
            row = int(res["row"])
            if self.rows is None:  # .npy: matrix row i is split row i
                if not 0 <= row < self.scores.shape[0]:
                    raise InputError(f"{self.source}: row {row} outside the matrix's {self.scores.shape[0]} rows")
                picks.append(row)
                continue
            if not self._index:
                self._index = {int(r): i for i, r in enumerate(self.rows.tolist())}
            i = self._index.get(row)
            if i is None:
                raise InputError(f"{self.source}: row {row} (result {k}) is not in the score matrix")
            if "item_id" in res and int(res["item_id"]) != int(self.item_ids[i]):
                raise InputError(f"{self.source}: row {row}: target item {res['item_id']} in the results, "
                                 f"{int(self.item_ids[i])} in the score matrix")
            if "user_id" in res and self.user_ids is not None and str(res["user_id"]) != str(self.user_ids[i]):
                raise InputError(f"{self.source}: row {row}: user {res['user_id']!r} in the results, "
                                 f"{self.user_ids[i]!r} in the score matrix")
            picks.append(i)
        return self.scores[torch.tensor(picks, dtype=torch.long)].float()


def save_scores(path: str | Path, scores: torch.Tensor, rows: Sequence[int], item_ids: Sequence[int],
                user_ids: Sequence, split: str, dtype: torch.dtype | None = None) -> None:
    """Write a score matrix with its rows' identity (atomic)."""
    scores = scores.detach().cpu()
    if dtype is not None:
        scores = scores.to(dtype)
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    items_t = torch.as_tensor(list(item_ids), dtype=torch.long)
    if scores.dim() != 2 or not (scores.shape[0] == len(rows_t) == len(items_t) == len(user_ids)):
        raise ValueError(f"scores {tuple(scores.shape)}, rows {len(rows_t)}, item_ids {len(items_t)} and "
                         f"user_ids {len(user_ids)} must agree")
    users = [u if isinstance(u, str) else int(u) for u in user_ids]
    meta = {"format": FORMAT, "split": split, "user_ids": json.dumps(users)}
    with atomic_path(path) as tmp:
        save_file({"scores": scores.contiguous(), "row": rows_t, "item_id": items_t}, str(tmp), metadata=meta)


def load_scores(path: str | Path) -> ScoreMatrix:
    """Read a ``.safetensors`` score file written by :func:`save_scores`, or a ``.npy`` matrix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"score matrix not found: {path}")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.ndim != 2:
            raise InputError(f"{path}: expected a 2-D [rows, items] matrix, got shape {array.shape}")
        return ScoreMatrix(scores=torch.from_numpy(np.ascontiguousarray(array)), source=str(path))
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InputError(f"{path}: not a bigrec score file (format {meta.get('format')!r})")
            tensors = {key: handle.get_tensor(key) for key in ("scores", "row", "item_id")}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(f"{path}: not a readable safetensors score file ({type(exc).__name__}: {exc})") from None
    users = json.loads(meta["user_ids"])
    if not (tensors["scores"].shape[0] == len(tensors["row"]) == len(tensors["item_id"]) == len(users)):
        raise InputError(f"{path}: scores, row, item_id and user_ids disagree in length")
    return ScoreMatrix(scores=tensors["scores"], rows=tensors["row"], item_ids=tensors["item_id"],
                       user_ids=users, split=meta.get("split"), source=str(path))


def ci_matrix(spec: Path, results: Results, role: str, num_items: int) -> tuple[torch.Tensor, Path]:
    """The score matrix aligned to ``results``: ``spec`` itself, or the first file in folder ``spec``
    whose rows match (preferring the result file's stem, then names starting with ``role``)."""
    if spec.is_file():
        candidates = [spec]
    elif spec.is_dir():
        stem = results.path.stem
        candidates = sorted(spec.glob("*.safetensors"),
                            key=lambda p: (p.stem != stem, not p.stem.startswith(role), p.name))
    else:
        raise FileNotFoundError(f"score matrix not found: {spec}")
    problems = []
    for path in candidates:
        try:
            scores = load_scores(path).align(results.rows)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if scores.shape[1] != num_items:
            raise InputError(f"{path}: {scores.shape[1]} item columns, but the catalogue has {num_items} items")
        return scores, path
    raise InputError(f"no score matrix in {spec} matches the rows of {results.path}: "
                     + ("; ".join(problems[:3]) or "no .safetensors files"))
