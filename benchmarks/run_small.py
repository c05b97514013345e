"""Every benchmark at a small size, end to end: does each one still run? (``make bench``)

    .venv/bin/python benchmarks/run_small.py                       # all of them
    .venv/bin/python benchmarks/run_small.py --only bench_serve    # some (comma-separated)

In a work folder it builds a tiny random Llama with its tokenizer (``tests/tiny.py``), a small
ml-100k-format dataset (``benchmarks/common.py``'s, which the tests' demo runs use) and a finished
``bigrec demo`` run on them with
all three decodings. Then it runs each ``benchmarks/bench_*.py`` in its own process with the
arguments in :data:`SMALL`, pointed at those, and prints a table: the script, its exit status, its
seconds and the last line it printed. It exits non-zero if any failed, or if a benchmark has no
entry in :data:`SMALL` (a new one must say how it runs small).

What the benchmarks print here measures nothing (a random 2-layer model on made-up rows): only
that they run is checked. Two have no model option: ``bench_decoding`` loads the bundled
SmolLM2-135M for two rows, and ``bench_prepare`` prepares the bundled ml-100k.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEMO_SMALL, demo_args, write_small_movielens

REPO = Path(__file__).resolve().parents[1]

# script -> its arguments; {model}, {source}, {run} and {work} are filled in, {{...}} stays a pattern
SMALL: dict[str, list[str]] = {
    "bench_decoding": ["--rows", "2", "--beams", "2", "--batch_size", "2", "--data", "{run}/data"],
    "bench_decoding_quality": ["--run", "{run}", "--rows", "6", "--valid_rows", "4", "--cf_weights", "1"],
    "bench_evaluate": ["--rows", "32", "--data", "{run}/data", "--base_model", "{model}",
                       "--workdir", "{work}/evaluate"],
    "bench_full_step": ["--source", "{source}", "--base_model", "{model}", "--steps", "3", "--chunks", "8",
                        "--workdir", "{work}/full_step"],
    "bench_generate": ["--rows", "4", "--test_data", "{run}/data/test_5000.json", "--base_model", "{model}",
                       "--lora_weights", "{run}/adapter", "--max_new_tokens", "8", "--ref_max_new_tokens", "8"],
    "bench_grounding": ["--run", "{run}"],
    "bench_learning_curve": ["--recipes", "demo", "--dataset", "ml-100k", "--source", "{source}",
                             "--base_model", "{model}", "--sample", "32", "--valid_rows", "8", "--points", "1",
                             "--num_beams", "2", "--sasrec_epochs", "2", "--set", "batch_size=8",
                             "--set", "micro_batch_size=8", "--set", "val_rows=8", "--run_dir", "{work}/curve"],
    "bench_loss": ["--base_model", "{model}", "--positions", "64", "--chunks", "16,64", "--repeats", "1"],
    "bench_likelihood": ["--run", "{run}", "--valid_rows", "4", "--test_rows", "6", "--knobs", "w0,w0-new",
                         "--beam_rows", "2", "--batch_size", "4", "--out", "{work}/likelihood/{{run}}"],
    "bench_new_titles": ["--adapter", "{run}/adapter", "--rows", "{run}/inputs/valid.json", "--data", "{run}/data",
                         "--index", "{run}/index.safetensors", "--out", "{work}/new_titles",
                         "--base_model", "{model}", "--num_beams", "2"],
    "bench_prepare": [],
    "bench_quality": ["--dataset", "ml-100k", "--source", "{source}", "--test_rows", "12", "--valid_rows", "8",
                      "--run_dir", "{work}/quality/{{recipe}}", "--set", "base_model={model}",
                      *[x for k, v in DEMO_SMALL.items() if k not in ("test_rows", "valid_rows")
                        for x in ("--set", f"{k}={v}")]],
    "bench_rank": ["--run", "{run}", "--base_model", "{model}", "--precision", "fp32", "--rows", "4",
                   "--nodes", "8,32", "--repeats", "1", "--tree_from", "0", "--ref_rows", "2",
                   "--ref_max_new_tokens", "8"],
    "bench_serve": ["--run", "{run}", "--clients", "2", "--requests", "5", "--warmup", "1"],
    "bench_train": ["--sample", "16", "--val_rows", "4", "--data", "{run}/data", "--base_model", "{model}",
                    "--workdir", "{work}/train"],
}


def scripts() -> list[str]:
    return sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))


def build_inputs(work: Path) -> dict[str, str]:
    """The tiny model, the small dataset and a finished demo run on them: the placeholders' values."""
    from bigrec.cli import main as cli
    from tiny import make_tiny_model  # tests/: on the path once main has run use_working_tree

    model = make_tiny_model(work / "model", "llama")
    source = write_small_movielens(work)
    run = work / "run"
    argv = demo_args(run, model, source, decoding="all", likelihood_gate="false")  # the benchmarks read every decoding
    if cli(argv) != 0:
        raise SystemExit(f"run_small: the small demo failed: {' '.join(argv)}")
    return {"model": model, "source": str(source), "run": str(run), "work": str(work)}


def run_one(script: str, values: dict[str, str], log_dir: Path) -> tuple[int, float, str]:
    argv = [a.format(**values) for a in SMALL[script]]
    log = log_dir / f"{script}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *argv], cwd=values["work"],
                            stdout=out, stderr=subprocess.STDOUT).returncode
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return rc, time.perf_counter() - started, (lines[-1] if lines else "")[:100]


def main(argv: list[str] | None = None) -> int:
    from device import use_working_tree

    use_working_tree()  # reruns this script with src/ and tests/ (the tiny model builder) on PYTHONPATH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark names (default: every bench_*.py)")
    parser.add_argument("--workdir", help="where the inputs, outputs and logs go (default: a temporary folder, "
                                          "removed when every benchmark passed)")
    args = parser.parse_args(argv)
    missing = sorted(set(scripts()) - set(SMALL))
    if missing:
        parser.error(f"no small arguments for {', '.join(missing)}: add them to SMALL in {Path(__file__).name}")
    chosen = args.only.split(",") if args.only else scripts()
    unknown = sorted(set(chosen) - set(SMALL))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(SMALL)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bigrec-bench-small-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"building the tiny model, data and demo run in {work} ...", flush=True)
    values = build_inputs(work)
    rows = []
    for script in chosen:
        print(f"== {script}", flush=True)
        rc, seconds, last = run_one(script, values, logs)
        rows.append((script, rc, seconds, last))
        print(f"   exit {rc} in {seconds:.0f} s{'' if rc == 0 else f'; log: {logs / script}.log'}", flush=True)
    print("\n| benchmark | exit | s | last line |\n|---|---|---|---|")
    for script, rc, seconds, last in rows:
        print(f"| {script} | {rc} | {seconds:.0f} | {last.replace('|', '/')} |")
    failed = [script for script, rc, _, _ in rows if rc != 0]
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (logs in {logs})")
        return 1
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
