"""``bigrec baseline``: train popularity or SASRec on the prepared splits, evaluate, export scores.

Evaluation uses ``bigrec.evaluation.metrics`` exactly as ``bigrec evaluate`` does: all-rank, one target
per row, the best rank among the ids sharing the target's title, no masking of history items.

Outputs in ``--output_dir``:

- ``metrics.json``: test metrics, ``{"topk": [...], "<model>": {"NDCG": [...], "HR": [...], "tied_targets": n}}``
  (``tied_targets``: rows whose target shares its score with another item; their metrics are the
  expectation under random tie-breaking);
  ``valid_metrics.json``: the same for the validation split.
- ``model.json`` + ``model.safetensors``: the model (``SASRec.from_dir`` / ``Popularity.from_dir``).
- ``scores/{valid,test,valid_5000,test_5000}.safetensors``: per-row score matrices
  (``bigrec.evaluation.scores``); float16 for the full splits, float32 for the 5,000-row samples.
- ``train_log.json`` (SASRec): loss and validation NDCG@10 per epoch; ``config.yaml``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigrec.baselines.data import Prepared, load_prepared, read_split, training_windows
from bigrec.baselines.popularity import Popularity, item_counts
from bigrec.baselines.sasrec import SASRec, SASRecConfig, fit
from bigrec.config import ConfigError, check_output_dir, option, to_dict
from bigrec.evaluation import metrics
from bigrec.evaluation.scores import save_scores
from bigrec.io import InputError, read_json, staged_dir, write_json, write_yaml
from bigrec.llm.sft_data import sample_indices

log = logging.getLogger(__name__)

Scorer = Callable[[torch.Tensor], torch.Tensor]  # contexts [B, L] -> scores [B, N]
SAMPLES = {"valid_5000": "valid", "test_5000": "test"}


@dataclass
class Config:
    data: str = option(help="prepared dataset folder (the --out of bigrec prepare)")
    output_dir: str = option(help="folder for metrics, model and score matrices")
    model: str = option("sasrec", "baseline to train", choices=["popularity", "sasrec"])
    max_len: int = option(10, "SASRec: history length (items before the target; longer than the "
                              "prepared 10 is rebuilt from the user's earlier rows)", minimum=1)
    hidden: int = option(64, "SASRec: embedding and attention width", minimum=1)
    layers: int = option(2, "SASRec: self-attention blocks", minimum=1)
    heads: int = option(1, "SASRec: attention heads", minimum=1)
    dropout: float = option(0.2, "SASRec: dropout rate")
    lr: float = option(1e-3, "SASRec: Adam learning rate")
    batch_size: int = option(256, "SASRec: training windows per step", minimum=1)
    epochs: int = option(200, "SASRec: maximum epochs", minimum=1)
    patience: int = option(10, "SASRec: stop after this many epochs without a better validation NDCG@10", minimum=1)
    loss: str = option("ce", "SASRec: full-softmax cross-entropy or BCE with sampled negatives",
                       choices=["ce", "bce"])
    negatives: int = option(1, "SASRec: sampled negatives per target with --loss bce", minimum=1)
    seed: int = option(42, "random seed (same seed, same metrics) and the seed of --sample")
    sample: int = option(-1, "train on this many train.csv rows drawn with --seed, the very rows `bigrec train "
                             "--sample N --seed S` draws from train.json (the paper's few-shot comparison); -1 = all")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    threads: int = option(0, "CPU threads for torch; 0 = every core this process may use")
    eval_batch_size: int = option(1024, "rows scored at once during evaluation", minimum=1)
    export_scores: bool = option(True, "write per-row score matrices under scores/")

    def validate(self) -> None:
        check_output_dir(self.output_dir, "output_dir")
        if self.sample == 0 or self.sample < -1:
            raise ConfigError(f"sample must be -1 (all rows) or at least 1, got {self.sample}")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def score_rows(scorer: Scorer, contexts: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Scores [R, N] (float32, on the CPU) for contexts [R, L], in batches."""
    parts = [scorer(contexts[lo:lo + batch_size]).float().cpu() for lo in range(0, len(contexts), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 0)


def evaluate(scores: torch.Tensor, targets: torch.Tensor, titles: list[str]) -> dict:
    """All-rank NDCG/HR at ``metrics.TOPK`` and ``tied_targets``, the targets level with another item.

    A target's rank is the best among ids with its title; a tie with other items (popularity counts
    tie often) takes each metric's expectation under random tie-breaking."""
    ranks = metrics.target_ranks(scores, metrics.target_id_lists(targets, titles), higher_is_better=True)
    return {**metrics.ndcg_hr(ranks, metrics.TOPK), "tied_targets": ranks.tied_targets()}


def sample_rows(data_dir: Path, name: str, data: Prepared) -> tuple[np.ndarray, list[dict]] | None:
    """Rows of ``<name>.json`` (e.g. ``test_5000``) as indices into their split, identity checked."""
    path = data_dir / f"{name}.json"
    if not path.is_file():
        log.warning("%s not found; no %s score matrix", path, name)
        return None
    rows = read_json(path)
    part = data.splits[SAMPLES[name]]
    idx = np.array([int(r["row"]) for r in rows], dtype=np.int64)
    for r in rows:
        i = int(r["row"])
        if not 0 <= i < len(part) or str(part.user_ids[i]) != str(r["user_id"]) \
                or int(part.targets[i]) != int(r["item_id"]):
            raise InputError(f"{path}: row {i} (user {r.get('user_id')!r}) does not match {part.name}.csv")
    return idx, rows


def export(stage: Path, name: str, scores: torch.Tensor, idx: np.ndarray, data: Prepared, split: str) -> None:
    part = data.splits[split]
    dtype = torch.float32 if name in SAMPLES else torch.float16
    save_scores(stage / "scores" / f"{name}.safetensors", scores, idx.tolist(), part.targets[idx].tolist(),
                [part.user_ids[i] for i in idx], split=name, dtype=dtype)


def popularity_scorer(data: Prepared) -> tuple[Popularity, Scorer]:
    """Counts of train targets, as they are: items with equal counts are tied, and the metrics
    count such ties at their expected value rather than breaking them by id."""
    model = Popularity(item_counts(data.splits["train"].targets, data.num_items))
    counts = model.counts.float()
    return model, lambda contexts: counts.unsqueeze(0).expand(len(contexts), -1)


def train_sasrec(config: Config, data: Prepared, device: torch.device) -> tuple[SASRec, dict]:
    inputs, targets = training_windows(data, config.max_len)
    log.info("SASRec: %d training windows of %d over %d train rows, %d items", len(inputs), config.max_len,
             len(data.splits["train"]), data.num_items)
    torch.manual_seed(config.seed)
    model = SASRec(SASRecConfig(num_items=data.num_items, max_len=config.max_len, hidden=config.hidden,
                                layers=config.layers, heads=config.heads, dropout=config.dropout)).to(device)
    valid_ctx = data.contexts("valid", config.max_len)
    valid_targets = metrics.target_id_lists(data.splits["valid"].targets, data.titles)

    def validate(m: SASRec) -> float:
        ranks = metrics.target_ranks(score_rows(m.score, valid_ctx, config.eval_batch_size), valid_targets,
                                     higher_is_better=True)
        return metrics.ndcg_hr(ranks, (10,))["NDCG"][0]

    result = fit(model, inputs, targets, validate, lr=config.lr, batch_size=config.batch_size,
                 epochs=config.epochs, patience=config.patience, loss=config.loss,
                 negatives=config.negatives, seed=config.seed)
    return model, {"best_epoch": result.best_epoch, "best_valid_ndcg10": result.best_metric,
                   "train_seconds": round(result.seconds, 1), "epochs": result.history}


def run(config: Config) -> dict:
    """Train, evaluate on valid and test, write the outputs; returns the test metrics.

    ``--threads`` holds for this stage only: the caller's thread count is restored after it (the
    demo runs later stages in the same process, and their results must not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(config.threads or len(os.sched_getaffinity(0)))
    try:
        return _run(config)
    finally:
        torch.set_num_threads(before)


def _run(config: Config) -> dict:
    data_dir, out_dir = Path(config.data), Path(config.output_dir)
    device = resolve_device(config.device)
    start = time.perf_counter()
    train_rows = None
    if config.sample >= 0:
        train_rows = sample_indices(len(read_split(data_dir, "train")), config.sample, config.seed)
        log.info("few-shot: %d train rows drawn with seed %d", len(train_rows), config.seed)
    data = load_prepared(data_dir, train_rows)
    if not len(data.splits["valid"]) or not len(data.splits["test"]):
        raise InputError(f"{data_dir}: valid.csv and test.csv need at least one row each")
    log.info("read %s: %d items, %d/%d/%d rows (%.1fs)", data_dir, data.num_items,
             *(len(data.splits[s]) for s in ("train", "valid", "test")), time.perf_counter() - start)
    with staged_dir(out_dir, whole=True) as stage:
        extra = {"catalog_digest": data.catalog_digest, "data": str(data_dir)}
        if config.model == "popularity":
            model, scorer = popularity_scorer(data)
            model.save(stage, extra)
            info: dict = {"train_seconds": round(time.perf_counter() - start, 1)}
        else:
            model, info = train_sasrec(config, data, device)
            model.save(stage, extra)
            write_json(stage / "train_log.json", info)
            scorer = model.score
        results = {}
        for split in ("valid", "test"):
            part = data.splits[split]
            scores = score_rows(scorer, data.contexts(split, config.max_len), config.eval_batch_size)
            results[split] = evaluate(scores, part.targets, data.titles)
            if config.export_scores:
                export(stage, split, model_scores(model, scores), np.arange(len(part)), data, split)
            del scores
        for name, split in SAMPLES.items():
            sample = sample_rows(data_dir, name, data) if config.export_scores else None
            if sample is not None:
                ctx = data.contexts(split, config.max_len, rows=sample[0])
                scores = score_rows(scorer, ctx, config.eval_batch_size)
                export(stage, name, model_scores(model, scores), sample[0], data, split)
        topk = list(metrics.TOPK)
        write_json(stage / "metrics.json", {"topk": topk, config.model: results["test"]})
        write_json(stage / "valid_metrics.json", {"topk": topk, config.model: results["valid"]})
        write_yaml(stage / "config.yaml", to_dict(config))
        if train_rows is not None:
            write_json(stage / "train_rows.json", train_rows)
    at = {k: results["test"]["NDCG"][topk.index(k)] for k in (1, 10)}
    log.info("%s test NDCG@1 %.4f NDCG@10 %.4f (%d of %d targets tied); %s (%.0fs in all)", config.model, at[1],
             at[10], results["test"]["tied_targets"], len(data.splits["test"]), out_dir,
             time.perf_counter() - start)
    return {**results["test"], **{k: v for k, v in info.items() if k != "epochs"}}


def model_scores(model: SASRec | Popularity, ranked: torch.Tensor) -> torch.Tensor:
    """What to export: the model's own scores (popularity: raw counts, not the tie-broken order)."""
    if isinstance(model, Popularity):
        return model.counts.unsqueeze(0).expand(len(ranked), -1)
    return ranked
