"""LoRA training checks: bigrec against the reference recipe at its batch, and the packed sweep (MFU)."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path

from device.measure import (
    PeakMemory,
    cuda_available,
    fail,
    free_memory,
    held_gib,
    row,
    steps_rate,
    time_limit,
    timed_trainers,
)
from device.shapes import make_rows, make_titles, write_rows


@contextlib.contextmanager
def reference_training_settings(micro: int, batch: int, lr: float):
    """``bench_train.train_reference`` as it is, with these batch sizes, and on a GPU run on the GPU with
    bf16 autocast (it hard-codes ``use_cpu=True``)."""
    import bench_train
    import transformers

    original_args, original_ref = transformers.TrainingArguments, bench_train.REF
    cuda = cuda_available()

    def training_arguments(**kwargs):
        kwargs.update(use_cpu=not cuda)
        if cuda:
            kwargs.update(bf16=True)
        return original_args(**kwargs)

    bench_train.REF = {"batch_size": batch, "micro_batch_size": micro, "learning_rate": lr, "warmup_steps": 0}
    transformers.TrainingArguments = training_arguments
    try:
        yield
    finally:
        transformers.TrainingArguments = original_args
        bench_train.REF = original_ref


def train_check(shape: str, base: str, work: Path, sizes: dict, args) -> tuple[dict, str | None]:
    """Row for LoRA training speed and memory; returns it and bigrec's adapter folder (None if it failed)."""
    import yaml

    from bigrec.stages.train import Config, run

    r = row("train", f"{shape}: LoRA training", shape, "tokens/s")
    started = time.perf_counter()
    warmup, steps, batch, micro = sizes["warmup"], sizes["steps"], sizes["batch_size"], sizes["micro_batch_size"]
    total = warmup + steps
    data = write_rows(work / "train.json", make_rows(total * batch, make_titles(400, seed=1), seed=10))
    adapter = None
    d = r["details"]
    d.update(steps_timed=steps, steps_untimed=warmup, batch_size=batch, micro_batch_size=micro)
    try:  # bigrec
        out = work / "bigrec_adapter"
        config = Config(base_model=base, train_data_path=[data], output_dir=str(out), batch_size=batch,
                        micro_batch_size=micro, num_epochs=1, max_steps=total, learning_rate=args.learning_rate,
                        warmup_steps=0, cutoff_len=args.cutoff_len, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                        lora_target_modules=["q_proj", "v_proj"], precision="auto", save_steps=total,
                        save_total_limit=1, resume_from_checkpoint="false", seed=args.seed)
        with time_limit(args.timeout, "bigrec training"), PeakMemory() as mem, timed_trainers() as times:
            summary = run(config)
        resolved = yaml.safe_load((out / "config.yaml").read_text())["run"]
        per_step = resolved["train_tokens"] / (resolved["train_rows"] / batch)
        r["bigrec"] = steps_rate(times, warmup, steps, per_step)
        d.update(bigrec_peak_gib=mem.gib, bigrec_compute=resolved["compute_dtype"],
                 bigrec_tokens_per_step=per_step, bigrec_steps=summary["global_step"],
                 bigrec_loss=summary["train_loss"],
                 bigrec_mfu=mfu(base, r["bigrec"], resolved["train_tokens"] / resolved["train_rows"], args.peaks,
                                bf16=resolved["compute_dtype"] == "bfloat16"))
        adapter = str(out)
    except Exception as exc:  # one failure is one FAIL row, not a crash
        fail(r, exc, "bigrec")
    free_memory()
    try:  # the reference recipe
        import bench_train

        ns = argparse.Namespace(seed=args.seed, base_model=base, cutoff_len=args.cutoff_len, data=str(work),
                                sample=-1)
        out = work / "reference_adapter"
        with reference_training_settings(micro, batch, args.learning_rate), \
                time_limit(args.timeout, "reference training"), PeakMemory() as mem, timed_trainers() as times:
            result = bench_train.train_reference(ns, out)
        per_step = result["tokens"] / (result["examples"] / batch)
        r["reference"] = steps_rate(times, warmup, steps, per_step)
        d.update(reference_peak_gib=mem.gib, reference_compute="float32" + (" + bf16 autocast" if cuda_available()
                                                                             else ""),
                 reference_tokens_per_step=per_step, reference_steps=result["steps"],
                 reference_loss=result["train_loss"],
                 reference_mfu=mfu(base, r["reference"], result["tokens"] / result["examples"], args.peaks,
                                   bf16=cuda_available()))
    except Exception as exc:
        fail(r, exc, "reference")
    free_memory()
    if r["bigrec"] and r["reference"]:
        r["ratio"] = r["bigrec"] / r["reference"]
    d["gpu_gib_held_after"] = held_gib()
    r["seconds"] = time.perf_counter() - started
    return r, adapter


def model_flops_per_token(base: str, example_tokens: float) -> float:
    """FLOPs of one trained token with LoRA: the forward pass and the backward pass's products for the
    activations' gradients (2 x the forward; the frozen weights get none), attention over half an
    example on average. Counted on the config alone (a meta-device model: no weights are read)."""
    import torch
    from peak import forward_flops
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return 3 * forward_flops(model, 1, context=example_tokens / 2)


def mfu(base: str, tokens_per_second: float, example_tokens: float, peaks, bf16: bool) -> float | None:
    """Model FLOPs utilisation: the model FLOPs a rate needs / the measured matmul peak of its dtype."""
    import torch

    peak = peaks.of(torch.bfloat16 if bf16 else torch.float32) if peaks else None
    if not peak:
        return None
    return tokens_per_second * model_flops_per_token(base, example_tokens) / peak


def sweep_check(shape: str, base: str, work: Path, micro: int, reference: float | None, sizes: dict,
                args) -> dict:
    """Row for bigrec's LoRA training with packing at micro-batch ``micro`` (no accumulation), against
    the reference recipe's rate at its own batch (``reference``, from the train row)."""
    import yaml

    from bigrec.stages.train import Config, run

    r = row("sweep", f"{shape}: LoRA training, packed, micro-batch {micro}", shape, "tokens/s")
    started = time.perf_counter()
    warmup, steps = sizes["warmup"], sizes["steps"]
    total = warmup + steps
    data = write_rows(work / f"sweep-{micro}.json", make_rows(total * micro, make_titles(400, seed=1), seed=11))
    d = r["details"]
    d.update(steps_timed=steps, steps_untimed=warmup, batch_size=micro, micro_batch_size=micro, packing=True)
    try:
        out = work / f"sweep-{micro}"
        config = Config(base_model=base, train_data_path=[data], output_dir=str(out), batch_size=micro,
                        micro_batch_size=micro, num_epochs=1, max_steps=total, learning_rate=args.learning_rate,
                        warmup_steps=0, cutoff_len=args.cutoff_len, lora_r=8, lora_alpha=16, lora_dropout=0.05,
                        lora_target_modules=["q_proj", "v_proj"], precision="auto", save_steps=total,
                        save_total_limit=1, resume_from_checkpoint="false", seed=args.seed, packing=True)
        with time_limit(args.timeout, "bigrec training"), PeakMemory() as mem, timed_trainers() as times:
            run(config)
        resolved = yaml.safe_load((out / "config.yaml").read_text())["run"]
        r["bigrec"] = steps_rate(times, warmup, steps, resolved["train_tokens"] / (resolved["train_rows"] / micro))
        d.update(peak_gib=mem.gib, compute=resolved["compute_dtype"],
                 mfu=mfu(base, r["bigrec"], resolved["train_tokens"] / resolved["train_rows"], args.peaks,
                         bf16=resolved["compute_dtype"] == "bfloat16"))
        shutil.rmtree(out, ignore_errors=True)
    except Exception as exc:
        fail(r, exc)
    free_memory()
    r["reference"] = reference
    if r["bigrec"] and reference:
        r["ratio"] = r["bigrec"] / reference
    r["seconds"] = time.perf_counter() - started
    return r

