"""Device check (issue 17): does bigrec work on a GPU, and how fast is it against the reference recipe?

    python benchmarks/device_check.py                     # on the GPU machine, default sizes
    python benchmarks/device_check.py --json out.json     # also write the rows as JSON
    .venv/bin/python benchmarks/device_check.py --tiny --skip_tests   # here, on a CPU: tiny sizes

Only the repository's working tree is needed: ``src/`` is put on the import path (and on
``PYTHONPATH`` for the subprocesses), models are built from configs with random weights (no
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
     rows; one row per ``--step_nodes`` value (nodes a row's search expands per model call). A
     random model is flat over titles, the search's worst case: the share of rows
     certified exact says how often it hit the node cap.

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
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

from common import free_port

REPO = Path(__file__).resolve().parents[1]
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TQDM_DISABLE": "1"}


def use_working_tree() -> None:
    """Put src/ (first: bigrec need not be installed), tests/ and benchmarks/ on the import path and
    QUIET_ENV's defaults in the environment; main calls it, so importing this module changes neither."""
    for path in (REPO / "benchmarks", REPO / "tests", REPO / "src"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


# name -> (architecture, config values)
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                 tie_word_embeddings=True)),
    "llama-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                               tie_word_embeddings=False)),
}
TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512)

# Sizes: flag -> (default, with --tiny). A flag given explicitly wins over both.
SIZES: dict[str, tuple[int, int]] = {
    "steps": (10, 3), "warmup": (2, 1), "batch_size": (8, 4), "micro_batch_size": (8, 2),
    "gen_rows": (64, 8), "gen_batch": (32, 4), "embed_rows": (1024, 64), "catalog_size": (2048, 128),
    "tokenizer_vocab": (4000, 400),
}
NUM_BEAMS = 4
CANDIDATES, SEARCH_NODES = 20, 3072  # likelihood ranking: bigrec generate's defaults
# micro-batches of the packed training sweep per shape (each fits an 80 GiB GPU without checkpointing)
SWEEPS: dict[str, tuple[int, ...]] = {"smollm2-135m": (8, 32, 128), "qwen2-0.5b": (8, 32, 64), "llama-7b": (8, 16)}
TINY_SWEEP = (2, 8)
CHECKS = ("train", "sweep", "generate", "embed", "likelihood")
PYTEST_RUNS = [["tests/test_generate.py", "tests/test_decoding.py", "tests/test_index.py"],
               ["tests/test_train.py", "-k", "lora or labelled"]]
HISTORY = 10
ACCEL_ROWS, ACCEL_GEN_ROWS = 16, 8

REAL_TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)", "Sabrina (1995)",
    "Mortal Kombat (1995)", "Usual Suspects, The (1995)", "Shining, The (1980)", "Star Wars (1977)",
    "Fargo (1996)", "Contact (1997)", "Godfather, The (1972)", "Pulp Fiction (1994)", "Titanic (1997)",
    "Scream (1996)", "Liar Liar (1997)", "Air Force One (1997)", "English Patient, The (1996)",
    "Return of the Jedi (1983)", "Independence Day (ID4) (1996)", "Raiders of the Lost Ark (1981)",
    "Silence of the Lambs, The (1991)", "Twelve Monkeys (1995)", "Rock, The (1996)", "Men in Black (1997)",
    "Schindler's List (1993)", "Braveheart (1995)", "Apollo 13 (1995)", "Forrest Gump (1994)",
    "Princess Bride, The (1987)", "Empire Strikes Back, The (1980)", "Fugitive, The (1993)",
    "Terminator 2: Judgment Day (1991)", "Back to the Future (1985)", "Dead Man Walking (1995)",
    "L.A. Confidential (1997)", "Good Will Hunting (1997)", "Jerry Maguire (1996)", "Amadeus (1984)",
]
_ADJECTIVES = ["Silent", "Last", "Broken", "Golden", "Hidden", "Dark", "Lost", "Wild", "Secret", "Red", "Cold",
               "Bright", "Long", "Little", "Final", "Strange", "Burning", "Quiet", "Electric", "Midnight"]
_NOUNS = ["River", "Kingdom", "Summer", "Garden", "Road", "Empire", "Storm", "City", "Island", "Heart",
          "Winter", "Game", "Shadow", "Mountain", "Station", "Dream", "Harbor", "Mirror", "Forest", "Letter"]


def log(message: str) -> None:
    print(f"[device_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --- made-up data -----------------------------------------------------------------------------

def make_titles(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct MovieLens-style titles: the real ones above, then made-up ones."""
    rng = random.Random(seed)
    titles = list(REAL_TITLES)
    seen = set(titles)
    while len(titles) < n:
        adj, noun, year = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.randint(1930, 2000)
        form = rng.randrange(4)
        title = (f"{adj} {noun} ({year})", f"{adj} {noun}, The ({year})", f"{noun} of the {adj} {rng.choice(_NOUNS)}"
                 f" ({year})", f"{adj} {noun} {rng.randint(2, 4)} ({year})")[form]
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles[:n]


def make_rows(n: int, titles: list[str], seed: int) -> list[dict]:
    """``n`` instruction rows with ``HISTORY``-title histories, as ``bigrec prepare`` writes them."""
    from bigrec.data.prompts import DOMAINS, instruction_row

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        picks = rng.sample(titles, HISTORY + 1)
        rows.append(instruction_row(DOMAINS["movie"], picks[:-1], picks[-1]))
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return str(path)


def build_model(folder: Path, arch: str, dims: dict, tokenizer_vocab: int, device: str, seed: int = 0) -> str:
    """A random-weight model of ``arch``/``dims`` with a locally trained BPE tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from bigrec.data.prompts import alpaca_prompt
    from tiny import build_tokenizer

    titles = make_titles(400, seed=seed + 1)
    texts = [alpaca_prompt(r["instruction"], r["input"], r["output"]) for r in make_rows(200, titles, seed)]
    tokenizer = build_tokenizer(texts + titles, vocab_size=tokenizer_vocab, add_bos=(arch == "llama"))
    values = dict(dims, vocab_size=max(dims["vocab_size"], len(tokenizer)), max_position_embeddings=2048,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(**values)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # tokens the tokenizer cannot decode get logit 0, below the real ones' maximum
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_memory()
    return str(folder)


# --- measurement helpers --------------------------------------------------------------------------

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_gib() -> float | None:
    import torch

    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak GPU memory allocated by torch inside the block; on a CPU the peak RSS, sampled every 10 ms."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def gib(self) -> float:
        return self.peak / 2**30


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise TimeoutError in the main thread when the block runs longer than ``seconds``."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} ran over the {seconds:g} s limit (--timeout)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class OnDevice:
    """A tokenizer whose encodings land on ``device`` (what ``device_map="auto"``'s hooks do for the
    reference scripts) and that keeps the token ids it is asked to ``batch_decode`` (in ``decoded``);
    every other attribute, read or set, is the wrapped tokenizer's."""

    def __init__(self, tokenizer, device):
        object.__setattr__(self, "_tok", tokenizer)
        object.__setattr__(self, "_device", device)
        object.__setattr__(self, "decoded", [])

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs).to(self._device)

    def batch_decode(self, sequences, *args, **kwargs):
        self.decoded.extend(sequences.tolist())
        return self._tok.batch_decode(sequences, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)


@contextlib.contextmanager
def timed_trainers():
    """While inside, every ``transformers.Trainer`` built (bigrec's subclass and the reference's
    plain one alike) records the end of each optimizer step -> [(step, seconds)]."""
    from transformers import Trainer, TrainerCallback

    times: list[tuple[int, float]] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            times.append((state.global_step, time.perf_counter()))

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.append((state.global_step, time.perf_counter()))

    original = Trainer.__init__

    def timed_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StepTimer())

    Trainer.__init__ = timed_init
    try:
        yield times
    finally:
        Trainer.__init__ = original


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


def steps_rate(times: list[tuple[int, float]], warmup: int, steps: int, tokens_per_step: float) -> float:
    marks = dict(times)  # step -> time at its end (0 = the start of training)
    last = warmup + steps
    if warmup not in marks or last not in marks:
        raise RuntimeError(f"step times recorded for steps {sorted(marks)}, need {warmup} and {last}")
    return tokens_per_step * steps / (marks[last] - marks[warmup])


# --- checks -----------------------------------------------------------------------------------------

def row(check: str, name: str, shape: str | None = None, unit: str | None = None) -> dict:
    return {"check": check, "name": name, "shape": shape, "status": "ok", "unit": unit, "bigrec": None,
            "reference": None, "ratio": None, "agreement": None, "details": {}, "error": None, "seconds": None}


def fail(r: dict, exc: BaseException, what: str | None = None) -> None:
    """Mark the row failed; a row that already failed keeps its first error and gains this one."""
    traceback.print_exc()
    message = one_line(exc)
    message = f"{what}: {message}" if what else message
    r["error"] = f"{r['error']}; {message}" if r["status"] == "FAIL" else message
    r["status"] = "FAIL"


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


def likelihood_check(shape: str, base: str, sizes: dict, args, step_nodes: int = 24) -> dict:
    """Row for likelihood ranking (the exact top ``CANDIDATES`` of a ``--catalog_size``-title catalogue per
    row), rows/s, against the reference recipe's beam search on the same model and rows (how the
    reference gets its list). A random model's distribution over titles is flat: the search's worst
    case, where most rows stop at ``SEARCH_NODES`` (the share certified exact is reported)."""
    import torch
    from bench_generate import reference_generate

    from bigrec.llm.layouts import get_layout
    from bigrec.llm.likelihood import TitleScorer
    from bigrec.llm.models import load_model

    r = row("likelihood", f"{shape}: likelihood ranking, {step_nodes} nodes a step", shape, "rows/s")
    started = time.perf_counter()
    n, batch = sizes["gen_rows"], sizes["gen_batch"]
    catalog = make_titles(sizes["catalog_size"], seed=3)
    rows = make_rows(n, catalog, seed=21)
    layout = get_layout("window")
    prompts = [layout.prompt(x) for x in rows]
    d = r["details"]
    d.update(rows=n, batch=batch, catalog=len(catalog), candidates=CANDIDATES, search_nodes=SEARCH_NODES,
             step_nodes=step_nodes,
             beams=NUM_BEAMS, new_tokens=args.new_tokens)
    device = "cuda" if cuda_available() else "cpu"
    model = None
    try:
        with time_limit(args.timeout, "likelihood ranking"), PeakMemory() as mem:
            model, tok = load_model(base, "auto", device=device)
            d["dtype"] = str(model.dtype).removeprefix("torch.")
            trie = layout.trie(tok, catalog)
            scorer = TitleScorer(model, tok, trie, batch_size=batch)
            scorer.rank(prompts[:batch], CANDIDATES, step_nodes=step_nodes, max_nodes=SEARCH_NODES)  # warm-up
            sync()
            t0 = time.perf_counter()
            rankings = []
            for lo in range(0, n, batch):
                rankings += scorer.rank(prompts[lo:lo + batch], CANDIDATES, step_nodes=step_nodes,
                                        max_nodes=SEARCH_NODES)
            sync()
            r["bigrec"] = n / (time.perf_counter() - t0)
        model.generation_config.min_new_tokens = args.new_tokens  # fixed length, as in the generate check
        d.update(peak_gib=mem.gib, trie_nodes=trie.num_nodes,
                 certified=sum(x.certified >= CANDIDATES for x in rankings),
                 distinct_top1=len({x.leaves[0] for x in rankings}))
        with time_limit(args.timeout, "reference beam search"), torch.no_grad():
            on_device = OnDevice(tok, device)
            reference_generate(model, on_device, prompts[:batch], NUM_BEAMS, args.new_tokens)  # warm-up
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                reference_generate(model, on_device, prompts[lo:lo + batch], NUM_BEAMS, args.new_tokens)
            sync()
            r["reference"] = n / (time.perf_counter() - t0)
        r["ratio"] = r["bigrec"] / r["reference"]
    except Exception as exc:
        fail(r, exc)
    model = None
    free_memory()
    r["seconds"] = time.perf_counter() - started
    return r


@contextlib.contextmanager
def title_end_never_stops():
    """bigrec's TitleEndCriteria still decodes every beam at every step but stops none (fixed length)."""
    import torch

    from bigrec.llm import generation as gen

    original = gen.TitleEndCriteria.__call__

    def never(self, input_ids, scores=None, **kwargs):
        return torch.zeros_like(original(self, input_ids, scores, **kwargs))

    gen.TitleEndCriteria.__call__ = never
    try:
        yield
    finally:
        gen.TitleEndCriteria.__call__ = original


def generate_check(shape: str, base: str, adapter: str | None, sizes: dict, args) -> dict:
    from bench_generate import reference_generate
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bigrec.data.prompts import normalize_title, prompt_for_row
    from bigrec.llm.generation import cut_title, generate_ids
    from bigrec.llm.models import load_model, load_tokenizer, resolve_dtype

    r = row("generate", f"{shape}: beam search", shape, "rows/s")
    started = time.perf_counter()
    n, batch, new = sizes["gen_rows"], sizes["gen_batch"], args.new_tokens
    rows = make_rows(n, make_titles(400, seed=1), seed=20)
    prompts = [prompt_for_row(x) for x in rows]
    d = r["details"]
    d.update(rows=n, batch=batch, beams=NUM_BEAMS, new_tokens=new, adapter=bool(adapter))
    device = "cuda" if cuda_available() else "cpu"
    ours: dict[int, str] = {}
    ours_ids: dict[int, list[int]] = {}
    model = ref_model = None
    try:
        with time_limit(args.timeout, "bigrec generation"), title_end_never_stops(), PeakMemory() as mem:
            model, tok = load_model(base, "auto", adapter, device=device)
            model.generation_config.min_new_tokens = new
            dtype = next(model.parameters()).dtype
            lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
            order = sorted(range(n), key=lambda i: (-lengths[i], i))
            for lo in range(0, n, batch):  # warm-up: the same batches (kernels and plans for every shape)
                generate_ids(model, tok, [prompts[i] for i in order[lo:lo + batch]], NUM_BEAMS, new)
            widths = set()
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                picks = order[lo:lo + batch]
                ids = generate_ids(model, tok, [prompts[i] for i in picks], NUM_BEAMS, new)
                widths.add(ids.shape[1])
                texts = tok.batch_decode(ids, skip_special_tokens=True)
                for j, i in enumerate(picks):
                    ours[i] = cut_title(texts[j * NUM_BEAMS])
                    ours_ids[i] = ids[j * NUM_BEAMS].tolist()
            seconds = time.perf_counter() - t0
        r["bigrec"] = n / seconds
        d.update(bigrec_dtype=str(dtype).removeprefix("torch."), bigrec_new_tokens=sorted(widths),
                 bigrec_peak_gib=mem.gib, mean_prompt_tokens=sum(lengths) / n)
        # untimed, outside the peak: plain model.generate on these very weights and batches; what it
        # answers differently is bigrec's generation path alone (not the merge, not the batching)
        plain = OnDevice(tok, device)
        with time_limit(args.timeout, "plain generate on bigrec's weights"):
            for lo in range(0, n, batch):
                reference_generate(model, plain, [prompts[i] for i in order[lo:lo + batch]], NUM_BEAMS, new)
        d["same_weights_same_top1"] = sum(ours_ids[i] == seq
                                          for i, seq in zip(order, plain.decoded[::NUM_BEAMS], strict=True))
    except Exception as exc:
        fail(r, exc, "bigrec")
    model = None  # the model goes before the next one loads, even after a failure
    free_memory()
    ref: list[str] = []
    ref_ids: list[list[int]] = []
    try:
        dtype = resolve_dtype("auto", device)  # what bigrec generates in: fp32 on a CPU, bf16 on a GPU
        with time_limit(args.timeout, "reference generation"), PeakMemory() as mem:
            ref_tok = load_tokenizer(base, padding_side="left")
            ref_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
            ref_model.config.pad_token_id = ref_tok.pad_token_id
            if adapter:
                ref_model = PeftModel.from_pretrained(ref_model, adapter)
            ref_model.to(device).eval()
            ref_model.generation_config.min_new_tokens = new
            on_device = OnDevice(ref_tok, device)
            for lo in range(0, n, batch):  # warm-up: the same batches, as bigrec's
                reference_generate(ref_model, on_device, prompts[lo:lo + batch], NUM_BEAMS, new)
            steps = set()
            on_device.decoded.clear()
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                texts, ran = reference_generate(ref_model, on_device, prompts[lo:lo + batch], NUM_BEAMS, new)
                ref.extend(texts)
                steps.add(ran)
            seconds = time.perf_counter() - t0
            ref_ids = on_device.decoded[::NUM_BEAMS]  # every row's first (best) sequence
            if ours_ids:  # untimed: the reference again, batched in bigrec's row order (the noise floor:
                on_device.decoded.clear()  # in bf16, other batch-mates and padding alone change some top-1s)
                for lo in range(0, n, batch):
                    reference_generate(ref_model, on_device, [prompts[i] for i in order[lo:lo + batch]],
                                       NUM_BEAMS, new)
                again = dict(zip(order, on_device.decoded[::NUM_BEAMS], strict=True))
                d["reference_self_same_top1"] = sum(again[i] == ref_ids[i] for i in range(n))
        r["reference"] = n / seconds
        d.update(reference_dtype=str(dtype).removeprefix("torch."), reference_new_tokens=sorted(steps),
                 reference_peak_gib=mem.gib)
    except Exception as exc:
        fail(r, exc, "reference")
    ref_model = None
    free_memory()
    if r["bigrec"] and r["reference"]:
        r["ratio"] = r["bigrec"] / r["reference"]
        same = sum(ours_ids[i] == ref_ids[i] for i in range(n))
        r["agreement"] = same / n
        d.update(same_top1=same, same_top1_title=sum(normalize_title(ours[i]) == normalize_title(ref[i])
                                                     for i in range(n)),
                 empty_top1_title=sum(1 for i in range(n) if not normalize_title(ours[i])),
                 example_bigrec=ours[0], example_reference=ref[0])
    d["gpu_gib_held_after"] = held_gib()
    r["seconds"] = time.perf_counter() - started
    return r


def embed_check(shape: str, base: str, sizes: dict, args) -> dict:
    import torch
    from bench_evaluate import reference_embed

    from bigrec.data.prompts import natural_title
    from bigrec.grounding.embedding import embed_texts
    from bigrec.llm.models import load_model

    r = row("embed", f"{shape}: embedding", shape, "rows/s")
    started = time.perf_counter()
    catalog = make_titles(sizes["catalog_size"], seed=3)
    rng = random.Random(30)
    queries = []
    for _ in range(sizes["embed_rows"]):
        title = natural_title(rng.choice(catalog))
        queries.append(title.rsplit(" (", 1)[0] if rng.random() < 0.3 else title)
    d = r["details"]
    d.update(rows=len(queries), catalog=len(catalog), bigrec_batch=64, reference_batch=16)
    device = "cuda" if cuda_available() else "cpu"
    model = None
    try:
        with time_limit(args.timeout, "embedding"), PeakMemory() as mem:
            model, tok = load_model(base, "auto", device=device)
            d["dtype"] = str(model.dtype).removeprefix("torch.")
            items = embed_texts(model, tok, catalog, 64)  # shared by both sides, not timed
            embed_texts(model, tok, queries[:8], 64)  # warm-up
            sync()
            t0 = time.perf_counter()
            ours = embed_texts(model, tok, queries, 64)
            r["bigrec"] = len(queries) / (time.perf_counter() - t0)
            on_device = OnDevice(tok, device)
            reference_embed(model, on_device, queries[:8])  # warm-up
            sync()
            t0 = time.perf_counter()
            ref = reference_embed(model, on_device, queries).float()
            r["reference"] = len(queries) / (time.perf_counter() - t0)
        d["peak_gib"] = mem.gib
        same = int((torch.cdist(ours, items).argmin(1) == torch.cdist(ref, items).argmin(1)).sum())
        r["agreement"] = same / len(queries)
        r["ratio"] = r["bigrec"] / r["reference"]
        d.update(same_nearest=same, max_abs_diff=float((ours - ref).abs().max()))
    except Exception as exc:
        fail(r, exc)
    model = None
    free_memory()
    d["gpu_gib_held_after"] = held_gib()
    r["seconds"] = time.perf_counter() - started
    return r


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
        for step_nodes in args.step_nodes:
            log(f"{label}: likelihood ranking, {step_nodes} nodes a step")
            emit(likelihood_check(label, base, sizes, args, step_nodes))
    shutil.rmtree(folder, ignore_errors=True)
    free_memory()


# --- subprocess checks ------------------------------------------------------------------------------

def sub_env() -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not cuda_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # the same thread count in both runs compared on a CPU
    return env


def run_sub(cmd: list[str], timeout: float, log_path: Path) -> int:
    """Run ``cmd`` in the repository root, output to ``log_path``; on timeout kill its process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=sub_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{log_path.stem} ran over the {timeout:g} s limit (--timeout); log {log_path}") \
                from None


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        tail = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return ""
    return " | ".join(tail)[-300:]


def pytest_check(args, work: Path) -> dict:
    import xml.etree.ElementTree as ET

    r = row("pytest", "pytest: generate, decoding, index, train -k 'lora or labelled'", unit="tests")
    started = time.perf_counter()
    runs = PYTEST_RUNS
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    try:
        for i, targets in enumerate(runs):
            xml = work / f"pytest-{i}.xml"
            logfile = work / f"pytest-{i}.log"
            code = run_sub([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets],
                           args.timeout, logfile)
            if not xml.is_file():
                raise RuntimeError(f"pytest exited {code} without a report: {log_tail(logfile)}")
            root = ET.parse(xml).getroot()
            for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
                failing += [f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
                            for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]
            if code not in (0, 1):  # 1 = some tests failed (counted); anything else is pytest itself failing
                raise RuntimeError(f"pytest exited {code}: {log_tail(logfile)}")
        failed = counts["failures"] + counts["errors"]
        passed = counts["tests"] - failed - counts["skipped"]
        r["bigrec"] = passed
        r["details"] = {"passed": passed, "failed": failed, "skipped": counts["skipped"], "failing": failing,
                        "logs": [str(work / f"pytest-{i}.log") for i in range(len(runs))]}
        if failed or passed == 0:
            r["status"] = "FAIL"
            r["error"] = f"{failed} failed: {', '.join(failing[:4])}{' ...' if len(failing) > 4 else ''}"
    except Exception as exc:
        fail(r, exc)
    r["seconds"] = time.perf_counter() - started
    return r


def accelerate_check(args, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    r = row("accelerate", "accelerate launch vs plain (tiny): train + generate", unit="equal")
    started = time.perf_counter()
    d = r["details"]
    cuda = cuda_available()
    config = REPO / "src" / "bigrec" / "configs" / "accelerate" / ("multi_gpu.yaml" if cuda else "cpu.yaml")
    d["accelerate_config"] = str(config.relative_to(REPO))
    try:
        folder = work / "accelerate"
        shutil.rmtree(folder, ignore_errors=True)
        base = build_model(folder / "model", "llama", dict(TINY_DIMS, tie_word_embeddings=True), 400,
                           "cuda" if cuda else "cpu", seed=args.seed)
        titles = make_titles(60, seed=5)
        train = write_rows(folder / "train.json", make_rows(ACCEL_ROWS, titles, seed=50))
        test = write_rows(folder / "test.json", make_rows(ACCEL_GEN_ROWS, titles, seed=51))
        def launch() -> list[str]:
            return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                    "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "bigrec"]

        def plain() -> list[str]:
            return [sys.executable, "-m", "bigrec"]

        train_args = ["train", "--base_model", base, "--train_data_path", train, "--batch_size", "4",
                      "--micro_batch_size", "2", "--max_steps", "3", "--num_epochs", "1", "--learning_rate", "1e-3",
                      "--warmup_steps", "0", "--precision", "fp32", "--attention", "eager", "--save_steps", "100",
                      "--resume_from_checkpoint", "false", "--seed", str(args.seed)]
        outs = {}
        for how, prefix in (("accelerate", launch), ("plain", plain)):
            out = folder / f"train-{how}"
            code = run_sub([*prefix(), *train_args, "--output_dir", str(out)], args.timeout, folder / f"train-{how}.log")
            if code != 0 or not (out / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"{how} training exited {code}: {log_tail(folder / f'train-{how}.log')}")
            outs[how] = load_file(str(out / "adapter_model.safetensors"))
        d["trained"] = "both"
        a, b = outs["accelerate"], outs["plain"]
        if set(a) != set(b):
            raise RuntimeError(f"the adapters hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        moved = max(float(b[k].float().abs().max()) for k in b if "lora_B" in k)
        d.update(adapters_equal=all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a),
                 adapters_identical=all(torch.equal(a[k], b[k]) for k in a), adapter_max_abs_diff=diff,
                 lora_B_max_abs=moved)
        gen_args = ["generate", "--base_model", base, "--lora_weights", str(folder / "train-plain"),
                    "--test_data_path", test, "--batch_size", "4", "--num_beams", str(NUM_BEAMS),
                    "--max_new_tokens", "16", "--precision", "fp32"]
        preds = {}
        for how, prefix in (("accelerate", launch), ("plain", plain)):
            out = folder / f"generate-{how}.json"
            code = run_sub([*prefix(), *gen_args, "--result_json_data", str(out)], args.timeout,
                           folder / f"generate-{how}.log")
            if code != 0 or not out.is_file():
                raise RuntimeError(f"{how} generation exited {code}: {log_tail(folder / f'generate-{how}.log')}")
            preds[how] = [x["predict"] for x in json.loads(out.read_text())]
        same = sum(x[0] == y[0] for x, y in zip(preds["accelerate"], preds["plain"], strict=True))
        r["agreement"] = same / len(preds["plain"])
        d.update(generate_rows=len(preds["plain"]), same_top1=same,
                 same_all_beams=sum(x == y for x, y in zip(preds["accelerate"], preds["plain"], strict=True)))
        if not d["adapters_equal"] or same != len(preds["plain"]):
            r["status"] = "FAIL"
            r["error"] = (f"adapters {'equal' if d['adapters_equal'] else 'differ'} (max |diff| {diff:.2e}); "
                          f"top-1 equal on {same}/{len(preds['plain'])} rows")
        shutil.rmtree(folder / "model", ignore_errors=True)
    except Exception as exc:
        fail(r, exc)
    free_memory()
    r["seconds"] = time.perf_counter() - started
    return r


# --- report -------------------------------------------------------------------------------------------

def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return str(x)
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def _gib(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "?" if x is None else f"{x:.1%}"


def notes(r: dict) -> str:
    d = r["details"]
    mem = "GPU mem" if cuda_available() else "RSS"
    parts = []
    if r["check"] == "pytest" and "passed" in d:
        parts.append(f"{d['passed']} passed, {d['failed']} failed, {d['skipped']} skipped")
    elif r["check"] == "train":
        parts.append(f"peak {mem} {_gib(d.get('bigrec_peak_gib'))} / {_gib(d.get('reference_peak_gib'))} GiB")
        parts.append(f"{d.get('bigrec_compute', '?')} / {d.get('reference_compute', '?')}")
        parts.append(f"{d['steps_timed']} steps timed after {d['steps_untimed']}, batch {d['batch_size']}/"
                     f"{d['micro_batch_size']}")
        parts.append(f"MFU {_pct(d.get('bigrec_mfu'))} / {_pct(d.get('reference_mfu'))}")
    elif r["check"] == "sweep":
        parts.append(f"MFU {_pct(d.get('mfu'))}; peak {mem} {_gib(d.get('peak_gib'))} GiB; {d.get('compute', '?')}")
        parts.append(f"{d['steps_timed']} steps timed after {d['steps_untimed']}; reference: the train row's")
    elif r["check"] == "likelihood":
        if "certified" in d:
            parts.append(f"top {d['candidates']} certified exact in {d['certified']}/{d['rows']} rows "
                         f"(--search_nodes {d['search_nodes']}); {d['distinct_top1']} distinct top-1")
        parts.append(f"catalogue {d['catalog']}, batch {d['batch']}, {d.get('dtype', '?')}; reference: its beam "
                     f"search, {d['beams']} beams x {d['new_tokens']} tokens, same model")
        parts.append(f"peak {mem} {_gib(d.get('peak_gib'))} GiB")
    elif r["check"] == "generate":
        if r["agreement"] is not None:
            parts.append(f"top-1 agrees {r['agreement']:.2f} ({d['same_top1']}/{d['rows']})")
        if "same_weights_same_top1" in d:
            parts.append(f"plain generate on bigrec's weights and batches {d['same_weights_same_top1']}/{d['rows']}")
        if "reference_self_same_top1" in d:
            parts.append(f"reference vs itself in bigrec's batches {d['reference_self_same_top1']}/{d['rows']}")
        parts.append(f"{d['rows']} rows, batch {d['batch']}, {d['beams']} beams, {d['new_tokens']} new tokens "
                     f"(ran {d.get('bigrec_new_tokens', '?')} / {d.get('reference_new_tokens', '?')})")
        parts.append(f"{d.get('bigrec_dtype', '?')} / {d.get('reference_dtype', '?')}")
        parts.append(f"peak {mem} {_gib(d.get('bigrec_peak_gib'))} / {_gib(d.get('reference_peak_gib'))} GiB")
    elif r["check"] == "embed":
        if r["agreement"] is not None:
            parts.append(f"nearest item agrees {r['agreement']:.2f} ({d['same_nearest']}/{d['rows']})")
        parts.append(f"{d['rows']} rows, catalogue {d['catalog']}, {d.get('dtype', '?')}")
    elif r["check"] == "accelerate":
        if "adapters_equal" in d:
            parts.append(f"both trained; adapters {'equal' if d['adapters_equal'] else 'DIFFER'} "
                         f"(max abs diff {d['adapter_max_abs_diff']:.1e}{', identical' if d['adapters_identical'] else ''})")
        if "same_top1" in d:
            parts.append(f"generate top-1 equal {d['same_top1']}/{d['generate_rows']}")
        parts.append(d["accelerate_config"])
    if r["error"]:
        parts.append(f"**{r['error']}**")
    return "; ".join(parts).replace("|", "/")


def table(rows: list[dict]) -> str:
    order = {"pytest": 0, **{check: 1 for check in CHECKS}, "accelerate": 2}
    lines = ["| check | status | bigrec | reference | bigrec/ref | unit | s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: order[r["check"]]):
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        unit = r["unit"] or ""
        bigrec = _num(r["bigrec"]) if r["check"] not in ("pytest", "accelerate") else ""
        lines.append(f"| {r['name']} | {r['status']} | {bigrec} | {_num(r['reference'])} | {ratio} | "
                     f"{unit if bigrec else ''} | {_num(r['seconds'])} | {notes(r)} |")
    return "\n".join(lines)


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
