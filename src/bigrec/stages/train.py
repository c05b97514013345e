"""Step 1 of BIGRec: instruction-tune a causal LM (LoRA by default) on recommendation prompts.

A thin layer over ``transformers.Trainer`` + ``peft``, so that ``accelerate launch`` (DDP,
DeepSpeed, CPU processes) works unchanged. What it adds: the reference script's flags,
prompt masking from the one prompt module, early stopping that keeps the best adapter,
a JSON-lines training log, and resumption (a rerun continues from the last complete
checkpoint in ``output_dir``).

Output folder: the adapter (plain ``PeftModel.from_pretrained`` loads it; a full model with
``--lora false``), the tokenizer, ``config.yaml`` (this config, the base model's identity and
the data drawn), ``train_log.jsonl``, and ``checkpoint-N/`` folders for resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from bigrec.config import ConfigError, option, to_dict
from bigrec.io import staged_dir, write_yaml
from bigrec.llm.defaults import PRECISION
from bigrec.llm.layouts import LAYOUT_HELP, LAYOUTS, Layout, get_layout
from bigrec.llm.lora_dropout import use_bits_dropout
from bigrec.llm.models import (
    DEFAULT_MODEL,
    load_model,
    model_fingerprint,
    resolve_base_model,
    resolve_dtype,
    use_cuda,
)
from bigrec.llm.sft_data import Collator, PackingCollator, load_rows

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
BEST_DIR = "best"  # the best adapter so far (lowest validation loss), inside output_dir
SNAPSHOT_DIR = "snapshots"  # --snapshot_epochs: snapshots/epoch-N inside output_dir


@dataclass
class Config:
    base_model: str = option(DEFAULT_MODEL, "model folder, hub id, or the bundled 'smollm2-135m'")
    train_data_path: list[str] = option(help="instruction JSON file(s); several are concatenated", factory=list)
    val_data_path: list[str] = option(help="validation instruction JSON file(s); none = no early stopping",
                                      factory=list)
    output_dir: str = option("./lora-alpaca", "where the adapter, tokenizer, config and log go")
    sample: int = option(-1, "rows drawn from each training file with --seed (-1 = all); with --layout timeline, "
                             "users (their whole timelines)")
    val_sample: int = option(-1, "rows drawn from the validation files with --seed (-1 = all)")
    seed: int = option(0, "seed for row sampling, LoRA init and data order")
    batch_size: int = option(128, "examples per optimizer step (across all processes)")
    micro_batch_size: int = option(4, "examples per forward pass and process")
    num_epochs: int = option(50, "maximum epochs (early stopping usually ends sooner)")
    max_steps: int = option(-1, "stop after this many optimizer steps (-1 = by epochs)")
    learning_rate: float = option(1e-4, "AdamW peak learning rate")
    warmup_steps: int = option(20, "linear warm-up steps")
    cutoff_len: int = option(512, "maximum tokens per example (prompt + response + EOS); with --layout timeline, "
                                  "per chunk of a user's timeline")
    layout: str = option("window", "the layout the training rows were prepared in (prepare --layout); " + LAYOUT_HELP
                         + " (loss on the targets only, whatever --train_on_inputs)",
                         choices=list(LAYOUTS), keyed_at_default=False)
    timeline_overlap: int = option(10, "--layout timeline: titles before a chunk's first target that start it again "
                                       "as context (no loss) when a timeline runs past --cutoff_len",
                                   minimum=0, keyed_at_default=False)
    lora: bool = option(True, "train a LoRA adapter; false = full fine-tuning")
    lora_r: int = option(8, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: list[str] = option(help="modules that get LoRA", factory=lambda: ["q_proj", "v_proj"])
    train_on_inputs: bool = option(True, "loss on the prompt too (reference default); false = response only")
    group_by_length: bool = option(False, "batch examples of similar length together")
    packing: bool = option(False, "pack each micro-batch's examples into as few rows of --cutoff_len tokens as "
                                  "fit, attention kept inside each example, instead of padding them (the same "
                                  "loss; fewer tokens through the model)", keyed_at_default=False)
    sparse_logits: bool = option(True, "compute LM-head logits only where the loss needs them (same loss, "
                                       "less time and memory); false = the model's own loss on full logits")
    loss_chunk: int = option(512, "with --sparse_logits: labelled positions whose logits the loss makes at a "
                                  "time, in reused buffers, from the LM head's weight (same loss; no "
                                  "[positions x vocabulary] tensors); 0 = all at once through the head",
                             minimum=0, keyed_at_default=False)
    share_prefix: bool = option(True, "run the prompt prefix every row of a micro-batch shares once, its cache "
                                      "repeated for the rows (the same loss; less compute where the loss is on "
                                      "the response only; one process only)")
    fused_adamw: bool = option(True, "AdamW as torch's fused kernel (one pass over each weight, CPU and GPU) instead "
                                     "of its multi-tensor one; the same update", keyed_at_default=False)
    trim_heap: int = option(10, "on a CPU: every N optimizer steps, return the free pages of the C heap to the "
                                "kernel (glibc malloc_trim), so that a long run's memory stays bounded; 0 = never",
                            minimum=0, changes_output=False)
    precision: str = option(PRECISION, "auto (bf16 where the hardware has it), fp32, bf16, fp16",
                            choices=["auto", "fp32", "bf16", "fp16"])
    attention: str = option("auto", "attention kernel: auto = the model's default (SDPA); eager may train "
                                    "faster on a CPU at a higher peak memory (docs/guide/training.md)",
                            choices=["auto", "eager", "sdpa", "flash_attention_2"])
    report_to: list[str] = option(help="where the Trainer also logs: none, or tensorboard, wandb, mlflow, ... as "
                                       "transformers names them (each needs its package)",
                                  factory=lambda: ["none"], changes_output=False)
    early_stopping_patience: int = option(5, "evaluations without a lower validation loss before stopping (0 = never)")
    eval_steps: int | None = option(None, "evaluate every N steps (default: at the end of each epoch)")
    snapshot_epochs: list[int] = option(help="save a copy of the adapter after each of these epochs "
                                             "(output_dir/snapshots/epoch-N, with its validation loss and time)",
                                        factory=list, keyed_at_default=False)
    stop_after_epoch: int | None = option(None, "pause after this epoch: the schedule stays planned over "
                                                "--num_epochs, and a rerun with a later value continues the run "
                                                "as if it had never stopped", keyed_at_default=False)
    save_steps: int = option(10, "write a resumable checkpoint every N optimizer steps")
    save_total_limit: int = option(2, "checkpoints kept (older ones are deleted)")
    resume_from_checkpoint: str | None = option(
        None, "a checkpoint-N folder, a run folder (its last checkpoint), or an adapter folder to start from; "
              "default: the last checkpoint in output_dir if any; 'false' = start afresh")

    def validate(self) -> None:
        if not self.train_data_path:
            raise ConfigError("--train_data_path: give at least one instruction JSON file")
        if self.micro_batch_size < 1 or self.batch_size < self.micro_batch_size:
            raise ConfigError("--batch_size must be >= --micro_batch_size >= 1")
        if self.cutoff_len < 8:
            raise ConfigError("--cutoff_len is too small to hold a prompt")
        if self.save_steps < 1:
            raise ConfigError("--save_steps must be >= 1")
        if any(e < 1 for e in self.snapshot_epochs):
            raise ConfigError("--snapshot_epochs: epochs are counted from 1")
        if self.stop_after_epoch is not None and self.stop_after_epoch < 1:
            raise ConfigError("--stop_after_epoch must be >= 1")


def lora_config(config: Config):
    """The one place LoRA settings become a ``peft.LoraConfig``."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` with a ``trainer_state.json`` (the Trainer writes it last,
    so a checkpoint cut short by a kill is skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def resolve_resume(config: Config) -> tuple[str | None, str | None]:
    """(Trainer checkpoint to resume, adapter to start from) for ``--resume_from_checkpoint``."""
    value = config.resume_from_checkpoint
    if value is None or value.strip().lower() in {"auto", "true", "last"}:
        found = last_complete_checkpoint(config.output_dir)
        if found is None and value is not None and value.strip().lower() != "auto":
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in {config.output_dir}")
        return found, None
    if value.strip().lower() in {"false", "no", "none", ""}:
        return None, None
    path = Path(value)
    if (path / "trainer_state.json").is_file():
        return str(path), None
    if (path / "adapter_config.json").is_file():
        return None, str(path)
    found = last_complete_checkpoint(path)
    if found:
        return found, None
    raise FileNotFoundError(f"--resume_from_checkpoint {value}: neither a Trainer checkpoint "
                            "(trainer_state.json), a run folder with one, nor an adapter (adapter_config.json)")


# Settings a resumed run may change: where it stops, how often it saves or evaluates, packing, the loss's
# chunking, the shared prefix and the optimizer's kernel (the same loss and update), heap trimming (no output).
# (num_epochs and max_steps re-plan the learning-rate decay; stop_after_epoch keeps it.)
RESUME_MAY_CHANGE = frozenset({"resume_from_checkpoint", "num_epochs", "max_steps", "save_steps", "save_total_limit",
                               "eval_steps", "early_stopping_patience", "report_to", "snapshot_epochs",
                               "stop_after_epoch", "packing", "loss_chunk", "trim_heap", "fused_adamw",
                               "share_prefix"})


def data_digest(train_rows: list, val_rows: list) -> str:
    """sha256 of the training and validation rows (or timelines) a run uses, after sampling."""
    def plain(row):
        return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row

    text = json.dumps([[plain(r) for r in train_rows], [plain(r) for r in val_rows]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_differences(out: Path, config: Config, fingerprint: dict, digest: str) -> list[str]:
    """How the run recorded in ``out/config.yaml`` differs from this one, in what a resume must keep:
    settings, base model and data (empty when it is the same run, or nothing is recorded)."""
    record = out / "config.yaml"
    if not record.is_file():
        return []
    before = yaml.safe_load(record.read_text()) or {}
    # an option added later is absent from an older run's record: it ran at the option's default
    added = {f.name: f.default for f in fields(Config)
             if not f.metadata.get("keyed_at_default", True) and f.default is not MISSING}
    old, new = {**added, **(before.get("config") or {})}, to_dict(config)
    diffs = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
             if key not in RESUME_MAY_CHANGE and old.get(key) != new.get(key)]
    if before.get("base_model") and before["base_model"] != fingerprint:
        diffs.append("base_model: another model (fingerprint differs)")
    if before.get("data_sha256", digest) != digest:  # runs recorded before the digest existed resume as before
        diffs.append("training or validation rows: other rows (their sha256 differs)")
    return diffs


def check_resumable(out: Path, checkpoint: str, config: Config, fingerprint: dict, digest: str) -> None:
    """Refuse to resume a checkpoint of ``out`` that was trained with other settings, another base
    model or other rows (it would crash on a shape mismatch, or silently continue another run),
    naming the differences. A checkpoint given by path, or a run folder without a record, resumes."""
    if Path(checkpoint).parent.resolve() != out.resolve():
        return
    diffs = run_differences(out, config, fingerprint, digest)
    if diffs:
        raise ConfigError(f"{out} holds {Path(checkpoint).name} of a run with other settings ({'; '.join(diffs)}); "
                          "rerun with the same settings to resume it, or with --resume_from_checkpoint false to "
                          "start over")


def other_run(config: Config) -> list[str]:
    """How the run already in ``config.output_dir`` differs from ``config``'s (settings, base model,
    rows): non-empty means resuming there would be refused, so a caller that owns the folder clears it."""
    train_rows, val_rows, _ = training_rows(config, get_layout(config.layout))
    return run_differences(Path(config.output_dir), config, model_fingerprint(resolve_base_model(config.base_model)),
                           data_digest(train_rows, val_rows))


def training_rows(config: Config, layout: Layout) -> tuple[list, list, list[dict]]:
    """(training rows or timelines, validation rows or one-target timelines, per-file selection),
    sampled as ``config`` says, in ``layout`` (``config.layout``'s)."""
    train_rows, selection = layout.load_training(config.train_data_path, config.sample, config.seed)
    val_rows, _ = load_rows(config.val_data_path, config.val_sample, config.seed) if config.val_data_path else ([], [])
    return train_rows, layout.validation_data(val_rows), selection


def build_model(config: Config, base: str, adapter: str | None):
    """The model to train: base (+ a new or given LoRA adapter) -> (model, tokenizer, compute dtype).

    With LoRA the frozen base sits in the compute dtype (it needs no fp32 master copy: less peak
    memory, the same speed and loss under autocast); the trained weights, adapter or full model,
    stay fp32 and autocast does the rest.
    """
    on_cuda = use_cuda()
    compute = resolve_dtype(config.precision, "cuda" if on_cuda else "cpu", "train")
    weights = compute if config.lora else torch.float32
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[weights]
    attention = None if config.attention == "auto" else config.attention
    model, tokenizer = load_model(base, precision=precision, device="cpu", for_training=True,
                                  lora_weights=adapter if config.lora else None, attn_implementation=attention)
    if config.lora and adapter is None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(config))
    elif not config.lora and adapter is not None:
        raise ConfigError("--resume_from_checkpoint names an adapter but --lora is false")
    if config.lora and not on_cuda:
        use_bits_dropout(model)
    return model, tokenizer, compute


def make_dataset(config: Config, layout: Layout, data: list, tokenizer, name: str):
    """Instruction rows as prompt/response examples, or timelines as chunks (``layout``, ``config.layout``'s)."""
    return layout.dataset(data, tokenizer, config.cutoff_len, name, train_on_inputs=config.train_on_inputs,
                          overlap=config.timeline_overlap)


def gradient_accumulation(config: Config, world: int) -> int:
    return max(1, config.batch_size // config.micro_batch_size // world)


def steps_per_epoch(rows: int, config: Config, world: int) -> int:
    """Optimizer steps in one epoch, counted as ``Trainer`` counts them (a last partial
    accumulation is a step)."""
    batches = math.ceil(math.ceil(rows / world) / config.micro_batch_size)
    grad_acc = gradient_accumulation(config, world)
    return max(batches // grad_acc + int(batches % grad_acc > 0), 1)


def training_arguments(config: Config, out: Path, compute: torch.dtype, has_validation: bool, world: int):
    """The ``TrainingArguments`` of a run: the reference's schedule, checkpoints every ``save_steps``.
    Without ``eval_steps`` the evaluation at each epoch's end is :class:`EpochMarks`'s."""
    from transformers import TrainingArguments

    grad_acc = gradient_accumulation(config, world)
    eval_strategy = "steps" if has_validation and config.eval_steps else "no"
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size, gradient_accumulation_steps=grad_acc,
        num_train_epochs=config.num_epochs, max_steps=config.max_steps, learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps, optim="adamw_torch_fused" if config.fused_adamw else "adamw_torch", lr_scheduler_type="linear",
        logging_steps=1, eval_strategy=eval_strategy, eval_steps=config.eval_steps,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        bf16=compute == torch.bfloat16, fp16=compute == torch.float16, use_cpu=not use_cuda(),
        seed=config.seed, data_seed=config.seed, report_to=config.report_to, prediction_loss_only=True,
        remove_unused_columns=False, ddp_find_unused_parameters=False if world > 1 else None,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        restore_callback_states_from_checkpoint=True, disable_tqdm=False,
        # the log's un-padded token count; on a GPU it would cost a host sync a micro-batch
        include_num_input_tokens_seen="no" if use_cuda() else "non_padding")


def save_result(trainer, tokenizer, out: Path, resolved: dict, summary: dict) -> None:
    """The output folder, swapped in whole: the best adapter (lowest validation loss, else the last
    step's), the tokenizer and config.yaml."""
    best_dir = out / BEST_DIR
    with staged_dir(out) as stage:
        if best_dir.is_dir():
            for item in best_dir.iterdir():
                if item.name != "best.json":
                    shutil.copy2(item, stage / item.name)
        else:
            trainer.model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        status = "paused" if summary.get("paused") else "done"
        write_yaml(stage / "config.yaml", {**resolved, "status": status, "result": summary})


def run(config: Config) -> dict[str, Any]:
    from transformers import ProgressCallback, set_seed

    from bigrec.llm.labelled_logits import LabelledLogits
    from bigrec.llm.training import (
        BigrecTrainer,
        Clock,
        EpochMarks,
        JsonlLog,
        KeepBest,
        QuietProgress,
        TrimHeap,
        best_loss,
        best_step,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(config.output_dir)
    # the data first: a bad file is an error before the model loads and before any folder is made
    layout = get_layout(config.layout)
    train_rows, val_rows, selection = training_rows(config, layout)
    set_seed(config.seed)
    base = resolve_base_model(config.base_model)
    fingerprint = model_fingerprint(base)
    digest = data_digest(train_rows, val_rows)
    checkpoint, adapter = resolve_resume(config)
    if checkpoint:
        check_resumable(out, checkpoint, config, fingerprint, digest)
        log.info("resuming from %s", checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, compute = build_model(config, base, adapter)
    if compute == torch.float16 and not use_cuda():
        raise ConfigError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
    if config.lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in model.parameters()))

    train_set = make_dataset(config, layout, train_rows, tokenizer, "train")
    val_set = make_dataset(config, layout, val_rows, tokenizer, "validation") if val_rows else None
    log.info("training on %d rows (%d tokens) from %d file(s); %d validation rows", len(train_set),
             train_set.num_tokens(), len(selection), len(val_set) if val_set else 0)
    args = training_arguments(config, out, compute, val_set is not None, world)
    resolved = {"stage": "train", "config": to_dict(config), "base_model": fingerprint, "data_sha256": digest,
                "run": {"world_size": args.world_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                        "compute_dtype": str(compute).removeprefix("torch."),
                        "resumed_from": checkpoint, "started_from_adapter": adapter,
                        "train_rows": len(train_set), "val_rows": len(val_set) if val_set else 0,
                        "train_tokens": train_set.num_tokens(), "data": selection}}
    best_dir = out / BEST_DIR
    labelled = LabelledLogits(model, config.loss_chunk) if config.sparse_logits else None
    per_epoch = steps_per_epoch(len(train_set), config, world)
    marks = EpochMarks(per_epoch, evaluate=val_set is not None and not config.eval_steps,
                       snapshot_dir=str(out / SNAPSHOT_DIR), snapshot_epochs=tuple(config.snapshot_epochs),
                       stop_after_epoch=config.stop_after_epoch)
    collator = (PackingCollator(tokenizer.pad_token_id, config.cutoff_len) if config.packing
                else Collator(tokenizer.pad_token_id))
    trainer = BigrecTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                            data_collator=collator, processing_class=tokenizer,
                            callbacks=[Clock(), JsonlLog(str(out / LOG_NAME), {"resumed_from": checkpoint}),
                                       KeepBest(str(best_dir), config.early_stopping_patience), marks],
                            labelled=labelled, share_prefix=config.share_prefix and world == 1)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress)
    if config.trim_heap and not use_cuda():
        trainer.add_callback(TrimHeap(config.trim_heap))
    if checkpoint is None and trainer.is_world_process_zero():
        for old in (best_dir, out / SNAPSHOT_DIR):  # a fresh run must not inherit an old run's best or snapshots
            shutil.rmtree(old, ignore_errors=True)
    if trainer.is_world_process_zero():
        write_yaml(out / "config.yaml", {**resolved, "status": "training"})
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        if labelled is not None:
            labelled.remove()
    state = trainer.state
    keep_best = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, KeepBest))
    summary = {"global_step": state.global_step, "max_steps": state.max_steps, "steps_per_epoch": per_epoch,
               "epoch": state.epoch, "train_loss": result.training_loss,
               "best_eval_loss": best_loss(best_dir), "best_step": best_step(best_dir), "paused": marks.paused,
               "early_stopped": bool(keep_best.patience and keep_best.bad_evals >= keep_best.patience),
               "shared_prefix_tokens": trainer.shared_tokens, **Clock.now()}
    if trainer.is_world_process_zero():
        save_result(trainer, tokenizer, out, resolved, summary)
        log.info("saved %s to %s (step %d, best validation loss %s)", "adapter" if config.lora else "model",
                 out, state.global_step, summary["best_eval_loss"])
    trainer.accelerator.wait_for_everyone()
    return summary
