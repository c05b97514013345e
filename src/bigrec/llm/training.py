"""Training pieces for ``transformers.Trainer``: the JSON-lines log, early stopping that keeps
the best adapter, a quieter progress bar, and a Trainer that computes only the labelled logits.

Importing this module imports transformers (slow); ``bigrec train`` imports it when it runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

log = logging.getLogger(__name__)


class JsonlLog(TrainerCallback):
    """Appends every Trainer log (loss per step, eval loss per evaluation) to a JSON-lines file."""

    def __init__(self, path: str, info: dict[str, Any]):
        self.path, self.info = path, info
        self.started = time.time()

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._write({"event": "start", "global_step": state.global_step, "max_steps": state.max_steps,
                         "world_size": args.world_size, **self.info})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._write({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                         "elapsed_s": round(time.time() - self.started, 3), **logs})

class KeepBest(TrainerCallback, ExportableState):
    """Early stopping on validation loss that saves the best model as it goes (to ``best_dir``).

    Trainer's own ``load_best_model_at_end`` would tie checkpoints to evaluations; this keeps
    frequent resumable checkpoints independent of the evaluation schedule.
    """

    def __init__(self, best_dir: str, patience: int = 5, best_loss: float | None = None,
                 best_step: int | None = None, bad_evals: int = 0):
        self.best_dir, self.patience = best_dir, patience
        self.best_loss, self.best_step, self.bad_evals = best_loss, best_step, bad_evals

    def state(self) -> dict:
        return {"args": {"best_dir": self.best_dir, "patience": self.patience},
                "attributes": {"best_loss": self.best_loss, "best_step": self.best_step,
                               "bad_evals": self.bad_evals}}

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = float(loss), state.global_step, 0
            if state.is_world_process_zero and model is not None:
                save_atomically(model, Path(self.best_dir), {"eval_loss": loss, "step": state.global_step})
            log.info("validation loss %.4f at step %d: best so far", loss, state.global_step)
        else:
            self.bad_evals += 1
            log.info("validation loss %.4f (best %.4f at step %s), %d/%d evaluations without improvement",
                     loss, self.best_loss, self.best_step, self.bad_evals, self.patience)
            if self.patience and self.bad_evals >= self.patience:
                control.should_training_stop = True

class QuietProgress(ProgressCallback):
    """The progress bar with the latest loss on it, instead of a printed dict per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in {"loss", "eval_loss"}}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class BigrecTrainer(Trainer):
    """``Trainer`` that, given a :class:`bigrec.llm.labelled_logits.LabelledLogits`, selects the LM head's
    rows for each batch."""

    def __init__(self, *args, labelled=None, **kwargs):
        super().__init__(*args, compute_loss_func=labelled.loss if labelled else None, **kwargs)
        self.labelled = labelled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.labelled is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.labelled.positions(inputs["labels"]):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def save_atomically(model, target: Path, meta: dict[str, Any]) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "best.json").write_text(json.dumps(meta) + "\n")
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def best_meta(best_dir: Path) -> dict[str, Any]:
    meta = best_dir / "best.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def best_loss(best_dir: Path) -> float | None:
    return best_meta(best_dir).get("eval_loss")


def best_step(best_dir: Path) -> int | None:
    return best_meta(best_dir).get("step")
