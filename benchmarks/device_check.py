"""Device check: does bigrec work on a GPU, and how fast is it against the reference recipe?

    python benchmarks/device_check.py                     # on the GPU machine, default sizes
    python benchmarks/device_check.py --json out.json     # also write the rows as JSON
    .venv/bin/python benchmarks/device_check.py --tiny --skip_tests   # here, on a CPU: tiny sizes

Only the repository's working tree is needed: the script reruns itself with ``src/``, ``tests/``
and ``benchmarks/`` leading ``PYTHONPATH`` (``device.use_working_tree``; its subprocesses inherit
it), models are built from configs with random weights (no
download), the rows are made up from a list of titles (no dataset file). It prints one markdown
table, a row per check, and exits non-zero if any check failed. Every check runs in its own
``try`` (a failure becomes a FAIL row with the error's first line) and under ``--timeout``
seconds (subprocesses are killed, in-process measurements interrupted by SIGALRM).

Checks, in the order they run:

1. ``pytest``: the fast tests that touch CUDA code paths (``tests/test_generate.py``,
   ``tests/test_decoding.py``, ``tests/test_index.py`` and ``tests/test_train.py -k "lora or
   labelled"``; none of them imports fastapi), in subprocesses; pass/fail counts from their
   JUnit XML. ``--skip_tests`` leaves it out.
2. ``accelerate``: ``bigrec train`` on a tiny random Llama for 3 optimizer steps (16 rows,
   batch 4, micro-batch 2, fp32, eager attention so that both runs use the same kernels), once
   through ``accelerate launch --config_file src/bigrec/configs/accelerate/multi_gpu.yaml
   --num_processes 1`` (``cpu.yaml`` without a GPU) and once as a plain ``python -m bigrec``;
   both must finish, and their adapters are compared (``allclose``, rtol 1e-4, atol 1e-6; the
   largest difference is reported). Then ``bigrec generate`` with the plain run's adapter
   (8 rows, 4 beams), through accelerate and plain: the share of rows with the same top-1.
3. Per model shape (``--shapes``; each built with ``AutoModelForCausalLM.from_config``, bf16 on a
   GPU and fp32 on a CPU, saved with a byte-level BPE tokenizer trained here on the made-up
   prompts by ``tests/tiny.py``'s ``build_tokenizer``; LM-head rows past the tokenizer's
   vocabulary are zeroed so that generated tokens decode to text):

   * ``smollm2-135m``: LlamaConfig, hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
     vocabulary 49152, tied embeddings;
   * ``qwen2-0.5b``: Qwen2Config, hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
     vocabulary 151936, tied embeddings;
   * ``llama-7b``: LlamaConfig, hidden 4096, 32 layers, 32 heads, 32 KV heads, MLP 11008,
     vocabulary 32000.

   ``--tiny`` replaces each by a model of the same architecture with hidden 64, 2 layers, 4
   heads, 2 KV heads, MLP 128, vocabulary 512, and every size below by a small one.

   * LoRA training, tokens/s and peak memory (``torch.cuda.max_memory_allocated``, model loading
     included; on a CPU this process's peak RSS sampled during the run, which includes whatever
     earlier checks left behind). bigrec: ``bigrec.stages.train.run`` (LoRA r 8 on q_proj,v_proj,
     precision auto = bf16 base and bf16 autocast on a GPU, loss on prompt and response as
     ``bigrec train``'s default, no checkpoint before the end). Reference:
     ``benchmarks/bench_train.py``'s ``train_reference`` (plain ``Trainer`` + ``peft``, fp32
     weights), run as it is except that on a GPU it runs on the GPU with bf16 autocast (the
     reference's own GPU recipe is fp16 autocast over 8-bit weights) and with these batch
     sizes. Both train on the same ``(--warmup + --steps) * --batch_size`` made-up rows (one
     epoch, 10-title histories, ``bigrec.data.prompts.instruction_row``); defaults: 2 untimed then 10
     timed optimizer steps, batch 8, micro-batch 8 (no accumulation). tokens/s = each recipe's own un-padded tokens per optimizer step
     (its epoch's tokens / steps) x the ``--steps`` timed steps / the time from the end of
     the ``--warmup``-th optimizer step to the end of the last (a Trainer callback, after
     ``torch.cuda.synchronize``).
   * Beam-search generation, rows/s: ``--gen_rows`` rows (default 64) in batches of
     ``--gen_batch`` (default 32), 4 beams, exactly ``--new_tokens`` (16) new tokens on both
     sides (``min_new_tokens`` keeps EOS away, and bigrec's title-end criterion still runs but
     never stops a beam), each side timed after an untimed pass over its own batches (on a GPU
     the first call of each new shape builds attention plans; whoever runs first would pay
     for both). bigrec: the model as ``bigrec generate``
     loads it (the adapter trained above merged in, precision auto = bf16 on a GPU, fp32 on a
     CPU), rows sorted by prompt length, ``bigrec.llm.generation.generate_ids``. Reference:
     ``benchmarks/bench_generate.py``'s ``reference_generate`` on base + unmerged
     ``PeftModel`` in the same dtype (the reference generates in half precision on a GPU),
     rows in file order, inputs moved to the model's device as ``device_map="auto"`` does
     there. Top-1 agreement: the share of rows whose best sequence has the same token ids on
     both sides (a random model's text is mostly blanks and repeats, so the same first title,
     ``cut_title`` and normalised as ``bench_generate.py`` compares, is only in the JSON details).
     Two untimed passes say where disagreement comes from: plain ``model.generate`` on bigrec's
     own (merged) weights and batches, against bigrec's top-1 (the generation path alone); and
     the reference again in bigrec's batches, against itself (what batching alone changes: in
     bf16 a random model's near-tied beams flip with their batch-mates and padding).
   * Embedding, rows/s: ``--embed_rows`` (default 1024) made-up generations (catalogue titles
     in natural order, some without their year) against a catalogue of ``--catalog_size``
     (default 2048) titles, base model as ``bigrec index`` loads it. bigrec:
     ``bigrec.grounding.embedding.embed_texts`` (batch 64); reference: ``benchmarks/bench_evaluate.py``'s
     ``reference_embed`` (batch 16, full LM forward, no ``no_grad``), same model object.
     Agreement: the share of rows whose nearest catalogue item (L2, the catalogue embedded by
     ``embed_texts`` for both) is the same.

   * Packed LoRA training sweep (``sweep``): bigrec as above with ``--packing`` at each micro-batch
     of ``--sweep`` (default per shape: ``SWEEPS``, the largest fitting an 80 GiB GPU without
     gradient checkpointing), no accumulation, the same timed steps; against the train row's
     reference rate at the reference's batch.
   * Likelihood ranking (``likelihood``), rows/s: the exact top 20 of a ``--catalog_size``-title
     catalogue for ``--gen_rows`` window prompts in batches of ``--gen_batch``
     (``bigrec.llm.likelihood.TitleScorer.rank``, ``bigrec generate``'s default ``--search_nodes``),
     against the reference's beam search (4 beams, ``--new_tokens`` tokens) on the same model and
     rows; one row per ``--step_nodes`` value (nodes a row's search expands per model call), the
     model loaded and the reference timed once for all of them. A random model is flat over
     titles, the search's worst case: the share of rows certified exact says how often it hit
     the node cap.

   Every training rate also gets its MFU: model FLOPs per trained token (forward plus the
   backward's activation gradients, 3x a forward pass, attention over half an example;
   ``benchmarks/peak.py``) x tokens/s / the matmul peak measured at the start in the dtype the
   products run in. ``--checks`` picks the per-shape checks (default: all five).

   Ratios are bigrec / reference (above 1: bigrec faster). Models are freed between
   measurements (``del``, ``gc.collect()``, ``torch.cuda.empty_cache()``).

Progress, warnings and tracebacks go to stderr, the table alone to stdout; ``--json PATH`` is
rewritten after every row, so a run cut short keeps what it measured. The default sizes are
meant to keep one H200 run short (most of the time goes to writing and reading the 7B model);
``--shapes``, ``--skip_tests`` and ``--skip_accelerate`` shorten it further. ``--tiny`` also uses
one torch thread (``--threads``), which tiny models run fastest with on a busy CPU.

Nothing in this docstring is a measurement; the figures are whatever the table says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from device import use_working_tree
from device.inference import embed_check, generate_check, likelihood_checks
from device.measure import cuda_available, fail, free_memory, log, row, time_limit
from device.processes import accelerate_check, pytest_check
from device.report import _num, notes, table
from device.shapes import CHECKS, SHAPES, SIZES, SWEEPS, TINY_DIMS, TINY_SWEEP, build_model
from device.training import sweep_check, train_check


def shape_checks(shape: str, sizes: dict, args, work: Path, emit) -> None:
    arch, dims = SHAPES[shape]
    if args.tiny:
        dims = dict(TINY_DIMS, tie_word_embeddings=dims["tie_word_embeddings"])
    folder = work / shape
    shutil.rmtree(folder, ignore_errors=True)
    label = f"{shape} (tiny)" if args.tiny else shape
    try:
        log(f"{label}: building a random {arch} model")
        started = time.perf_counter()
        with time_limit(args.timeout, "building the model"):
            base = build_model(folder / "model", arch, dims, sizes["tokenizer_vocab"],
                               "cuda" if cuda_available() else "cpu", seed=args.seed)
        log(f"{label}: model saved in {time.perf_counter() - started:.1f}s")
    except Exception as exc:
        for check in args.checks:
            r = row(check, f"{label}: {check}", label)
            fail(r, exc, "building the model")
            emit(r)
        shutil.rmtree(folder, ignore_errors=True)
        return
    adapter = reference_rate = None
    if "train" in args.checks:
        log(f"{label}: training (bigrec, then the reference)")
        r, adapter = train_check(label, base, folder, sizes, args)
        reference_rate = r["reference"]
        emit(r)
    if "sweep" in args.checks:
        for micro in args.sweep or (TINY_SWEEP if args.tiny else SWEEPS[shape]):
            log(f"{label}: packed training at micro-batch {micro}")
            emit(sweep_check(label, base, folder, micro, reference_rate, sizes, args))
    if "generate" in args.checks:
        log(f"{label}: generation")
        emit(generate_check(label, base, adapter, sizes, args))
    if "embed" in args.checks:
        log(f"{label}: embedding")
        emit(embed_check(label, base, sizes, args))
    if "likelihood" in args.checks:
        log(f"{label}: likelihood ranking, {', '.join(map(str, args.step_nodes))} nodes a step")
        for r in likelihood_checks(label, base, sizes, args):
            emit(r)
    shutil.rmtree(folder, ignore_errors=True)
    free_memory()


def main(argv: list[str] | None = None) -> int:
    use_working_tree()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (a CPU, or a quick try)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    parser.add_argument("--skip_tests", action="store_true", help="leave out the pytest run")
    parser.add_argument("--skip_accelerate", action="store_true", help="leave out the accelerate check")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated per-shape checks, a subset of {', '.join(CHECKS)}")
    parser.add_argument("--sweep", help="micro-batches of the packed training sweep, comma-separated (default per "
                                        "shape: " + "; ".join(f"{k} {','.join(map(str, v))}" for k, v in SWEEPS.items())
                                        + f"; with --tiny {','.join(map(str, TINY_SWEEP))})")
    parser.add_argument("--step_nodes", default="24", help="likelihood ranking: nodes each row's search expands per "
                                                            "model call, comma-separated (one row each)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per subprocess and per measurement")
    parser.add_argument("--workdir", help="where models, data and logs go (default: a temporary folder, removed)")
    for name, (full, tiny) in SIZES.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=f"default {full}, with --tiny {tiny}")
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens every beam generates")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--cutoff_len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads here and OMP_NUM_THREADS in subprocesses (default: torch's own; "
                             "with --tiny 1, which tiny models run fastest with on a busy CPU)")
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    if set(args.checks) - set(CHECKS):
        parser.error(f"unknown checks {sorted(set(args.checks) - set(CHECKS))}; choose from {', '.join(CHECKS)}")
    try:
        args.sweep = [int(m) for m in args.sweep.split(",")] if args.sweep else None
    except ValueError:
        parser.error(f"--sweep {args.sweep!r}: expected comma-separated integers")
    try:
        args.step_nodes = [int(m) for m in args.step_nodes.split(",")]
    except ValueError:
        parser.error(f"--step_nodes {args.step_nodes!r}: expected comma-separated integers")
    sizes = {name: getattr(args, name) if getattr(args, name) is not None else (tiny if args.tiny else full)
             for name, (full, tiny) in SIZES.items()}
    if sizes["batch_size"] % sizes["micro_batch_size"]:
        parser.error("--batch_size must be a multiple of --micro_batch_size")

    started = time.perf_counter()
    temporary = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bigrec-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = args.threads if args.threads is not None else (1 if args.tiny else 0)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Unfeasible length constraints")  # min_new_tokens in the warm-ups
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, torch threads: {torch.get_num_threads()})"
    log(f"{device}; torch {torch.__version__}; work folder {work}; sizes {sizes}")
    from peak import measure_peaks

    args.peaks = measure_peaks("cuda" if cuda else "cpu")
    log(args.peaks.line())
    report = {"device": device, "torch": torch.__version__, "cuda": cuda, "tiny": args.tiny, "sizes": sizes,
              "peaks": {"fp32": args.peaks.fp32, "bf16": args.peaks.bf16},
              "args": {k: v for k, v in vars(args).items() if k != "peaks"}, "rows": []}

    def emit(r: dict) -> None:
        report["rows"].append(r)
        rates = f" {_num(r['bigrec'])} vs {_num(r['reference'])} {r['unit']}" if r["reference"] else ""
        log(f"{r['name']}: {r['status']}{rates}; {notes(r)}")
        if args.json:  # after every row: a run cut short still leaves what it measured
            report["total_seconds"] = time.perf_counter() - started
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's printed logs too: stdout is for the table
            if not args.skip_tests:
                log("pytest (subprocesses)")
                emit(pytest_check(args, work))
            if not args.skip_accelerate:
                log("accelerate launch vs plain (subprocesses)")
                emit(accelerate_check(args, work))
            for shape in shapes:
                shape_checks(shape, sizes, args, work, emit)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = time.perf_counter() - started
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{device}, torch {torch.__version__}{', tiny sizes' if args.tiny else ''}; "
          f"{report['total_seconds']:.0f} s in all; {args.peaks.line()}\n")
    print(table(report["rows"]))
    print("\nbigrec/ref: bigrec's rate / the reference recipe's (above 1: bigrec faster). Memory columns in notes: "
          "bigrec / reference.")
    failed = [r["name"] for r in report["rows"] if r["status"] != "ok"]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0



if __name__ == "__main__":
    sys.exit(main())
