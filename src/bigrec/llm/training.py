"""Training pieces for ``transformers.Trainer``: the JSON-lines log, early stopping that keeps
the best adapter, a clock that survives resumption, epoch marks (evaluation, snapshots and a
pause at epoch ends), a quieter progress bar, and a Trainer that computes only the labelled logits.

Importing this module imports transformers (slow); ``bigrec train`` imports it when it runs.
"""

from __future__ import annotations

import ctypes
import functools
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

# what the Trainer adds to every step's log when it counts tokens; the run's own speed is logged at its end
STEP_SPEED_KEYS = frozenset({"train_runtime", "train_samples_per_second", "train_steps_per_second",
                             "train_tokens_per_second"})


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
            if "loss" in logs:  # a step's log: counting tokens makes the Trainer add its session's speed to it
                logs = {k: v for k, v in logs.items() if k not in STEP_SPEED_KEYS}
            self._write({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                         "elapsed_s": round(time.time() - self.started, 3),
                         **{f"total_{k}": v for k, v in Clock.now().items()}, **logs})

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

class Clock(TrainerCallback, ExportableState):
    """Wall and CPU seconds (user + system, all threads) spent in training and validation, summed
    over every run of a resumed training. Saved in each checkpoint, so a resumed run counts the
    time up to its checkpoint (work lost to a kill after it is not counted). Model loading is not.

    The Trainer replaces a stateful callback by a new instance when it resumes, so the other
    callbacks read the newest clock (:meth:`now`) instead of holding one.
    """

    _latest: Clock | None = None

    def __init__(self, wall_s: float = 0.0, cpu_s: float = 0.0):
        self.wall_s, self.cpu_s = wall_s, cpu_s
        # this process's share starts when the callback is made (by the Trainer or on restore)
        self._wall0, self._cpu0 = time.monotonic(), time.process_time()
        Clock._latest = self

    def totals(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s + time.monotonic() - self._wall0, 3),
                "cpu_s": round(self.cpu_s + time.process_time() - self._cpu0, 3)}

    @classmethod
    def now(cls) -> dict[str, float]:
        return cls._latest.totals() if cls._latest is not None else {}

    def state(self) -> dict:
        return {"args": {}, "attributes": {"wall_s": (t := self.totals())["wall_s"], "cpu_s": t["cpu_s"]}}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> bool:
    """Hand the free pages inside glibc's heap back to the kernel (``malloc_trim(0)``); False where
    there is no glibc or nothing was returned."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


class TrimHeap(TrainerCallback):
    """Every ``every`` optimizer steps of a CPU run, :func:`trim_heap`. Activations of changing
    sizes fragment glibc's heap: freed blocks stay resident, and a full fine-tuning process grew
    by about 170 MB a step until it filled the machine. Each trim makes the next step fault its
    working set in again, so it is not done every step (docs/performance.md)."""

    def __init__(self, every: int = 1):
        self.every, self.trims = max(1, every), 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            trim_heap()
            self.trims += 1


class EpochMarks(TrainerCallback):
    """What happens at the end of an epoch's last optimizer step.

    - Validation (when there is a validation set), in the same step as that step's checkpoint and
      before it, so a checkpoint at an epoch end already holds its evaluation (with
      ``eval_strategy="epoch"`` the Trainer evaluates after the checkpoint, and a run resumed
      there would skip that evaluation).
    - A snapshot of the adapter after each epoch in ``snapshot_epochs`` (``snapshots/epoch-N``,
      with its validation loss and the :class:`Clock` totals in ``snapshot.json``).
    - A pause after ``stop_after_epoch``: a checkpoint, then the run ends. The learning-rate
      schedule stays planned over the whole run, so a rerun with a later pause continues it
      exactly as one uninterrupted run would.
    """

    def __init__(self, steps_per_epoch: int, evaluate: bool, snapshot_dir: str | None = None,
                 snapshot_epochs: tuple[int, ...] = (), stop_after_epoch: int | None = None):
        self.steps_per_epoch, self.evaluate = steps_per_epoch, evaluate
        self.snapshot_dir, self.snapshot_epochs = snapshot_dir, set(snapshot_epochs)
        self.stop_after_epoch = stop_after_epoch
        self.paused = False

    def on_train_begin(self, args, state, control, **kwargs):
        planned = self.steps_per_epoch * args.num_train_epochs
        if args.max_steps <= 0 and state.max_steps != planned:
            raise RuntimeError(f"the Trainer planned {state.max_steps} steps, not {self.steps_per_epoch} per epoch x "
                               f"{args.num_train_epochs:g}: epoch ends would be misplaced")

    def epoch_end(self, state) -> int | None:
        steps = self.steps_per_epoch
        return state.global_step // steps if state.global_step % steps == 0 else None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        epoch = self.epoch_end(state)
        if epoch is None:
            return
        if self.evaluate:
            control.should_evaluate = True  # the snapshot follows the evaluation (on_evaluate)
        elif epoch in self.snapshot_epochs:
            self.snapshot(state, epoch, model, None, kwargs.get("processing_class"))
        if self.stop_after_epoch is not None and epoch >= self.stop_after_epoch and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.paused = True

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        epoch = self.epoch_end(state)
        if epoch in self.snapshot_epochs:
            self.snapshot(state, epoch, model, (metrics or {}).get("eval_loss"), kwargs.get("processing_class"))

    def snapshot(self, state, epoch: int, model, eval_loss: float | None, tokenizer=None) -> None:
        if not state.is_world_process_zero or model is None or self.snapshot_dir is None:
            return
        meta = {"epoch": epoch, "step": state.global_step, "eval_loss": eval_loss, **Clock.now()}
        save_atomically(model, Path(self.snapshot_dir) / f"epoch-{epoch}", meta, "snapshot.json", tokenizer)
        log.info("snapshot of epoch %d (step %d) saved", epoch, state.global_step)


class QuietProgress(ProgressCallback):
    """The progress bar with the latest loss on it, instead of a printed dict per step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{v:.4g}" for k, v in logs.items() if k in {"loss", "eval_loss"}}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class BigrecTrainer(Trainer):
    """``Trainer`` that, given a :class:`bigrec.llm.labelled_logits.LabelledLogits`, selects the LM head's
    rows for each batch; with ``share_prefix``, runs a training batch's common prompt prefix once
    (:mod:`bigrec.llm.shared_prefix`)."""

    def __init__(self, *args, labelled=None, share_prefix: bool = False, **kwargs):
        super().__init__(*args, compute_loss_func=labelled.loss if labelled else None, **kwargs)
        self.labelled = labelled
        self.share_prefix = share_prefix and not self.is_deepspeed_enabled
        self.shared_tokens = 0  # prompt tokens this process ran once for a batch instead of once per row

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "attention_mask" not in inputs:  # packed rows: transformers finds them from the position ids only
            inputs = {**inputs, "use_cache": False}  # when no cache is passed
        elif self.share_prefix and not return_outputs:
            from bigrec.llm.shared_prefix import shared_length, split_batch

            if length := shared_length(inputs["input_ids"], inputs["attention_mask"], inputs["labels"]):
                self.shared_tokens += length * (inputs["input_ids"].shape[0] - 1)
                inputs = split_batch(model, inputs, length)
        if self.labelled is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.labelled.positions(inputs["labels"]):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def save_atomically(model, target: Path, meta: dict[str, Any], meta_name: str = "best.json",
                    tokenizer=None) -> None:
    """``model`` (and ``tokenizer``: a fully fine-tuned snapshot is then a model folder generation
    loads as it is) into ``target``, never leaving a half-written folder under that name."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / meta_name).write_text(json.dumps(meta) + "\n")
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
