"""Full fine-tuning speed (`demo --config full-data`'s training): the step before, now and the reference's way, one run.

    .venv/bin/python benchmarks/bench_full_step.py [--data DIR] [--base_model smollm2-135m] [--steps 4]
        [--chunks 16] [--settings before,now,reference] [--workdir /tmp/bench_full_step]

Every setting trains ``--steps`` optimizer steps of the training ``bigrec demo --config full-data``
runs (every weight, timeline chunks of up to 512 tokens, ``--chunks`` chunks a step) from the same
seed, so each step sees the same chunks in the same order; each runs in its own process. Settings
(only what differs from the demo's training):

* ``before``: the config as it was measured before these defaults: micro-batches of 8 chunks
  (padded to the longest, with an attention mask) and AdamW's multi-tensor kernel.
* ``now``: as ``full-data.yaml`` ships.
* ``reference``: the reference's way of computing a step: micro-batches of 4, the model's own loss
  over logits at every position (no ``--sparse_logits``), AdamW's multi-tensor kernel.

Printed per setting: seconds a step and real (un-padded) tokens/s over the steps after the first
(the first pays warm-up: allocation, and compilation where on), the ratio against ``before`` and
``reference``, the model FLOP rate in 6N a token (N = every parameter, the measure of issue
reports) as a share of this machine's matmul peak in the dtype the step computes in
(``benchmarks/peak.py``), peak RSS, and every step's training loss beside ``before``'s with the
largest difference: the settings change how a step is computed, not what it computes.

``--data`` is a folder written by ``bigrec prepare --layout timeline``; without it ml-100k (the
bundled copy, or ``--source``) is prepared into the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
from pathlib import Path

import yaml
from common import run_child

SETTINGS = {
    "before": {"micro_batch_size": 8, "fused_adamw": False},
    "now": {},
    "reference": {"micro_batch_size": 4, "sparse_logits": False, "fused_adamw": False},
}
DEFAULT_SETTINGS = ("before", "now", "reference")


def child(args) -> None:
    import dataclasses

    from bigrec.config import build, load_yaml
    from bigrec.stages import demo
    from bigrec.stages.train import LOG_NAME, run

    out = Path(args.workdir) / args.child
    # the training `bigrec demo --config full-data` runs, on this data, for --steps steps of --chunks chunks
    recipe = build(demo.Config, {**load_yaml("full-data"), "base_model": args.base_model})
    config = dataclasses.replace(
        demo.train_config(recipe, demo.Paths(out)), train_data_path=[str(Path(args.data) / "train.json")],
        val_data_path=[], output_dir=str(out), resume_from_checkpoint="false", batch_size=args.chunks,
        max_steps=args.steps, save_steps=10 ** 6, snapshot_epochs=[], **SETTINGS[args.child])
    config.validate()
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: no log or checkpoint of an earlier one
    run(config)
    logs = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    steps = [r for r in logs if "loss" in r and "step" in r]
    result = {"settings": {"micro_batch_size": config.micro_batch_size}, "steps": steps,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "compute": yaml.safe_load((out / "config.yaml").read_text())["run"]["compute_dtype"]}
    Path(args.result).write_text(json.dumps(result))


def timing(steps: list[dict]) -> tuple[float, float]:
    """(seconds a step, real tokens a second) over the steps after the first."""
    if len(steps) < 2:
        raise SystemExit("--steps must be at least 2: the first step is warm-up and is not timed")
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    tokens = steps[-1]["num_input_tokens_seen"] - steps[0]["num_input_tokens_seen"]
    return seconds / (len(steps) - 1), tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a `bigrec prepare --layout timeline` folder (default: ml-100k, prepared here)")
    parser.add_argument("--source", help="a local copy of ml-100k for that (bigrec prepare --source)")
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per setting (the first is not timed)")
    parser.add_argument("--chunks", type=int, default=16, help="timeline chunks per optimizer step (--batch_size)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma-separated, of {list(SETTINGS)}")
    parser.add_argument("--workdir", default="/tmp/bench_full_step")
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    if set(names) - set(SETTINGS):
        raise SystemExit(f"unknown settings {sorted(set(names) - set(SETTINGS))}; choose from {list(SETTINGS)}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else workdir / "data"
    if not (data / "train.json").is_file():
        from bigrec.cli import main as cli

        print(f"preparing ml-100k (timeline layout) into {data} ...", flush=True)
        source = ["--source", args.source] if args.source else []
        if cli(["prepare", "--dataset", "ml-100k", "--layout", "timeline", "--out", str(data), *source]):
            raise SystemExit("bigrec prepare failed")

    import torch
    from peak import measure_peaks

    from bigrec.llm.models import resolve_base_model

    base = resolve_base_model(args.base_model)  # the bundled model is converted once, outside the timings
    peaks = measure_peaks()
    print(peaks.line(), flush=True)
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).parameters())
    print(f"model {base} ({params / 1e6:.1f}M parameters); {args.chunks} timeline chunks a step of "
          f"{data / 'train.json'}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads", flush=True)

    results: dict[str, dict] = {}
    for name in names:
        result_file, log_file = workdir / f"{name}.result.json", workdir / f"{name}.log"
        cmd = [sys.executable, __file__, "--child", name, "--result", str(result_file), "--data", str(data),
               "--base_model", base, "--steps", str(args.steps), "--chunks", str(args.chunks),
               "--workdir", str(workdir)]
        if (result := run_child(name, cmd, result_file, log_file)) is not None:
            results[name] = result
    if not results:
        raise SystemExit("no setting finished")

    speed = {name: timing(r["steps"]) for name, r in results.items()}
    head = (f"{'setting':<10} {'micro':>5} {'s/step':>8} {'tokens/s':>9} {'vs before':>9} {'vs ref':>7} "
            f"{'peak RSS':>9}  6N model FLOP rate")
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results.items():
        step_s, tps = speed[name]
        ratio = {other: tps / speed[other][1] if other in speed else float("nan") for other in ("before", "reference")}
        rate, peak = 6 * params * tps, peaks.of(getattr(torch, r["compute"]))
        print(f"{name:<10} {r['settings']['micro_batch_size']:>5} {step_s:>8.2f} {tps:>9.1f} {ratio['before']:>8.2f}x "
              f"{ratio['reference']:>6.2f}x {r['peak_rss_mb'] / 1024:>6.2f}GiB  {rate / 1e9:,.1f} GFLOP/s"
              + (f" = {rate / peak:.0%} of the {r['compute']} peak" if peak else ""))
    first = next(iter(results))
    print(f"\ntraining loss per step (against {first}):")
    for name, r in results.items():
        losses = [s["loss"] for s in r["steps"]]
        diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(r["steps"], results[first]["steps"], strict=False))
        print(f"  {name:<10} " + " ".join(f"{x:.4f}" for x in losses) + f"   largest difference {diff:.2e}")
    print("\ns/step and tokens/s over the steps after the first (un-padded tokens, the Trainer's count); "
          "6N: N = every parameter.")


if __name__ == "__main__":
    main()
