"""LoRA training speed, memory and validation loss: `bigrec train` vs the reference recipe; prints figures.

    .venv/bin/python benchmarks/bench_train.py [--sample 1024] [--val_rows 64] [--data /tmp/prep/ml-100k]
        [--base_model smollm2-135m] [--recipes ours_demo,ours_ref,reference] [--seed 42]

Recipes, each trained for one epoch on the same ``--sample`` rows of ``train.json`` (drawn with
``--seed`` by :func:`bigrec.llm.sft_data.load_rows`), each in its own subprocess so that peak RSS is
that recipe's alone:

* ``ours_demo``: ``bigrec.stages.train.run`` with the demo's settings (batch 16, micro-batch 8, lr 5e-4,
  loss on the response only, precision auto = bf16 autocast on a CPU with native bf16, the
  demo's warm-up ``min(20, max(1, sample // 16 // 4))``).
* ``ours_demo_dense`` (not run by default): ``ours_demo`` with ``sparse_logits`` false, i.e.
  logits at every position: what computing them only where the loss needs them is worth.
* ``ours_demo_mb1`` (not run by default): ``ours_demo`` one row a forward pass (micro-batch 1): no
  padding and no attention mask, so SDPA keeps its causal kernel (the full-data recipe's setting).
* ``ours_demo_unshared`` (not run by default): ``ours_demo`` with ``share_prefix`` false, every row's
  prompt run whole: what running a micro-batch's common prompt prefix once is worth.
* ``ours_ref``: ``bigrec.stages.train.run`` with the reference's settings (batch 128, micro-batch 4,
  lr 1e-4, 20 warm-up steps, loss on prompt and response) at precision auto.
* ``reference``: the reference BIGRec recipe restated here: plain ``transformers.Trainer`` +
  ``peft`` in fp32, same LoRA (r 8, alpha 16, dropout 0.05, q_proj/v_proj), batch 128, micro-batch
  4, lr 1e-4, 20 warm-up steps, prompt and output tokenised together with EOS appended
  (``train_on_inputs`` true), left padding, ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``, a
  checkpoint at the end of the epoch. Its GPU-only parts (8-bit loading, fp16, torch.compile)
  are left out; the pad token is id 0 as in the reference wherever that is not EOS.

Neither recipe evaluates during training (validation is measured afterwards, the same way for
all). tokens/s = the recipe's own un-padded tokens in the epoch / the Trainer's train_runtime
(model loading and tokenisation excluded; ours' periodic resumable checkpoints included).
Validation loss: mean loss per response token (the output title + EOS, prompt masked, our
tokenisation) on ``--val_rows`` rows of ``valid.json`` drawn with ``--seed``, fp32, for the base
model and every adapter.

Against the hardware: the machine's matmul peak is measured first (``benchmarks/peak.py``), and
each recipe's model FLOP rate is printed as a share of the peak of the dtype it computes in.
Model FLOPs per token: 4 x the transformer's linear weights (the forward product and the
activation gradient; frozen weights need no weight gradient, LoRA's are negligible); the LM
head and attention are left out, so the share is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from common import run_child

from bigrec.llm.defaults import PRECISION

# the demo's settings with one part changed: what that part is worth
VARIANTS = {"ours_demo_dense": {"sparse_logits": False}, "ours_demo_mb1": {"micro_batch_size": 1},
            "ours_demo_unshared": {"share_prefix": False}}
RECIPES = ("ours_demo", "ours_ref", "reference", *VARIANTS)
DEFAULT_RECIPES = RECIPES[:3]
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
REF = {"batch_size": 128, "micro_batch_size": 4, "learning_rate": 1e-4, "warmup_steps": 20}
DEMO = {"batch_size": 16, "micro_batch_size": 8, "learning_rate": 5e-4}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_ours(args, out: Path, demo: bool, changed: dict | None = None) -> dict:
    import yaml

    from bigrec.stages.train import LOG_NAME, Config, run

    settings = dict(DEMO, warmup_steps=min(20, max(1, args.sample // DEMO["batch_size"] // 4)),
                    train_on_inputs=False) if demo else dict(REF, train_on_inputs=True)
    settings.update(changed or {})
    config = Config(base_model=args.base_model, train_data_path=[str(Path(args.data) / "train.json")],
                    output_dir=str(out), sample=args.sample, seed=args.seed, num_epochs=1,
                    cutoff_len=args.cutoff_len, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                    lora_dropout=LORA["dropout"], lora_target_modules=list(LORA["targets"]),
                    precision=args.precision, resume_from_checkpoint="false", attention=args.attention,
                    **settings)
    started = time.perf_counter()
    summary = run(config)
    wall = time.perf_counter() - started
    rss = peak_rss_mb()
    logs = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    runtime = next(r["train_runtime"] for r in reversed(logs) if "train_runtime" in r)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    return {"tokens": resolved["run"]["train_tokens"], "examples": resolved["run"]["train_rows"],
            "train_runtime": runtime, "wall": wall, "peak_rss_mb": rss, "steps": summary["global_step"],
            "train_loss": summary["train_loss"], "compute": resolved["run"]["compute_dtype"], "adapter": str(out),
            "settings": settings}


def train_reference(args, out: Path) -> dict:
    """The reference recipe, restated: Trainer + peft, fp32, joint prompt+output tokenisation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from bigrec.data.prompts import prompt_for_row
    from bigrec.llm.models import load_tokenizer, resolve_base_model
    from bigrec.llm.sft_data import load_rows

    started = time.perf_counter()
    set_seed(args.seed)
    base = resolve_base_model(args.base_model)
    tok = load_tokenizer(base, padding_side="left")  # the reference pads on the left in training too
    if tok.eos_token_id != 0 and tok.convert_ids_to_tokens(0) is not None:
        tok.pad_token_id = 0  # the reference's pad id (unk in LLaMA; <|endoftext|> in SmolLM2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=list(LORA["targets"]), bias="none",
                                             task_type="CAUSAL_LM"))
    model.config.use_cache = False

    def tokenize(row: dict) -> dict:
        ids = tok(prompt_for_row(row, with_output=True), truncation=True, max_length=args.cutoff_len)["input_ids"]
        if ids[-1] != tok.eos_token_id and len(ids) < args.cutoff_len:
            ids = ids + [tok.eos_token_id]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    rows, _ = load_rows([str(Path(args.data) / "train.json")], args.sample, args.seed)
    data = [tokenize(r) for r in rows]
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=REF["micro_batch_size"],
        per_device_eval_batch_size=REF["micro_batch_size"],
        gradient_accumulation_steps=REF["batch_size"] // REF["micro_batch_size"],
        warmup_steps=REF["warmup_steps"], num_train_epochs=1, learning_rate=REF["learning_rate"],
        logging_steps=8, optim="adamw_torch", eval_strategy="no", save_strategy="epoch", save_total_limit=1,
        use_cpu=True, seed=args.seed, data_seed=args.seed, report_to="none", disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tok, pad_to_multiple_of=8, return_tensors="pt",
                                                           padding=True))
    result = trainer.train()
    rss = peak_rss_mb()
    model.save_pretrained(out / "adapter")
    return {"tokens": sum(len(d["input_ids"]) for d in data), "examples": len(data),
            "train_runtime": result.metrics["train_runtime"], "wall": time.perf_counter() - started,
            "peak_rss_mb": rss, "steps": trainer.state.global_step, "train_loss": result.training_loss,
            "compute": "float32", "adapter": str(out / "adapter"), "settings": dict(REF, train_on_inputs=True)}


def child(args) -> None:
    out = Path(args.workdir) / args.child
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if args.child == "reference":
        result = train_reference(args, out)
    else:
        result = train_ours(args, out, demo=args.child.startswith("ours_demo"), changed=VARIANTS.get(args.child))
    Path(args.result).write_text(json.dumps(result))


def validation_loss(base: str, adapter: str | None, rows: list[dict], cutoff_len: int, batch: int) -> float:
    """Mean loss per response token (title + EOS) of ``rows``, fp32; the same code for every model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bigrec.llm.models import load_tokenizer
    from bigrec.llm.sft_data import IGNORE_INDEX, Collator, encode_row

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tok = load_tokenizer(base, padding_side="right")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    encoded = [encode_row(r, tok, cutoff_len, train_on_inputs=False) for r in rows]
    collate = Collator(tok.pad_token_id)
    total, count = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, len(encoded), batch):
            b = collate(encoded[lo:lo + batch])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=1024, help="training rows drawn from train.json")
    parser.add_argument("--val_rows", type=int, default=64, help="validation rows for the loss after training")
    parser.add_argument("--data", default="/tmp/prep/ml-100k", help="prepared ml-100k (prepared here if absent)")
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated subset of {RECIPES}")
    parser.add_argument("--precision", default=PRECISION, help="ours' precision (the reference is always fp32)")
    parser.add_argument("--attention", default="auto", help="ours' attention kernel (bigrec train --attention)")
    parser.add_argument("--cutoff_len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval_batch", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/bench_train", help="adapters and checkpoints go here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = torch's default)")
    parser.add_argument("--child", choices=RECIPES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; choose from {RECIPES}")
    data = Path(args.data)
    if not (data / "train.json").is_file():
        from bigrec.cli import main as cli

        print(f"preparing ml-100k into {data} ...", flush=True)
        if cli(["prepare", "--dataset", "ml-100k", "--out", str(data)]):
            raise SystemExit("bigrec prepare failed")
    from bigrec.llm.models import cpu_has_bf16, resolve_base_model

    base = resolve_base_model(args.base_model)  # converts the bundled model once, outside the timings
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import torch
    from peak import linear_params, measure_peaks, share
    from transformers import AutoModelForCausalLM

    peaks = measure_peaks()
    print(peaks.line(), flush=True)
    body_params, _ = linear_params(AutoModelForCausalLM.from_pretrained(base))
    print(f"model {base}; {args.sample} training rows of {data / 'train.json'} (seed {args.seed}); "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, native bf16: {cpu_has_bf16()}",
          flush=True)

    results: dict[str, dict] = {}
    for recipe in recipes:
        result_file = workdir / f"{recipe}.result.json"
        log_file = workdir / f"{recipe}.log"
        cmd = [sys.executable, __file__, "--child", recipe, "--result", str(result_file), "--sample",
               str(args.sample), "--data", str(data), "--base_model", base, "--precision", args.precision,
               "--cutoff_len", str(args.cutoff_len), "--attention", args.attention, "--seed", str(args.seed), "--workdir", str(workdir),
               "--threads", str(args.threads)]
        if (r := run_child(recipe, cmd, result_file, log_file)) is None:
            continue
        results[recipe] = r
        print(f"[{recipe}] {r['steps']} steps, {r['tokens']} tokens in {r['train_runtime']:.1f}s", flush=True)

    from bigrec.llm.sft_data import load_rows

    val_rows, _ = load_rows([str(data / "valid.json")], args.val_rows, args.seed)
    print(f"validation loss on {len(val_rows)} rows of {data / 'valid.json'} ...", flush=True)
    base_loss = validation_loss(base, None, val_rows, args.cutoff_len, args.eval_batch)
    for r in results.values():
        r["val_loss"] = validation_loss(base, r["adapter"], val_rows, args.cutoff_len, args.eval_batch)

    print(f"\nbase model (no adapter): validation loss {base_loss:.4f} per response token\n")
    head = (f"{'recipe':<15} {'compute':<9} {'batch/micro':>11} {'lr':>7} {'loss on':>9} {'steps':>5} "
            f"{'tokens':>7} {'train s':>8} {'tokens/s':>8} {'vs ref':>6} {'peak RSS':>9} {'val loss':>8}  model FLOP rate")
    print(head)
    print("-" * len(head))
    ref_speed = results["reference"]["tokens"] / results["reference"]["train_runtime"] \
        if "reference" in results else math.nan
    for name, r in results.items():
        s = r["settings"]
        speed = r["tokens"] / r["train_runtime"]
        print(f"{name:<15} {r['compute']:<9} {s['batch_size']:>5}/{s['micro_batch_size']:<5} "
              f"{s['learning_rate']:>7.0e} {'all' if s['train_on_inputs'] else 'response':>9} {r['steps']:>5} "
              f"{r['tokens']:>7} {r['train_runtime']:>8.1f} {speed:>8.1f} {speed / ref_speed:>5.2f}x "
              f"{r['peak_rss_mb'] / 1024:>6.2f}GiB {r['val_loss']:>8.4f}  "
              f"{share(4 * body_params * speed, peaks, getattr(torch, r['compute']))}")
    print("\ntokens/s: un-padded tokens of one epoch / Trainer train_runtime; peak RSS: the recipe's process "
          "(getrusage ru_maxrss at the end of training); val loss: mean per response token, fp32, same rows "
          "and code for all.")


if __name__ == "__main__":
    main()
