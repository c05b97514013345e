"""Time catalogue-constrained beam search on SmolLM2-135M and ml-100k; prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_decoding.py [--rows 20] [--beams 10,50] [--batch_size 4]
        [--data /tmp/prep/ml-100k] [--precision auto]

No adapter: the base model, so the figures are about speed (rows/s, the share of the step time
spent in the trie logits processor, the prefill's and decode steps' share of the machine's
measured matmul peak, ``benchmarks/peak.py``), not about recommendation quality. Precision as
``bigrec generate`` resolves it (auto: prompts encoded in bf16 where the CPU has it, decode fp32). The data is prepared
with ``bigrec prepare`` when the folder is absent; the model is converted once into the cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_generate import phase_rates
from peak import measure_peaks, share

from bigrec.cli import main as cli
from bigrec.data.catalog import read_catalog
from bigrec.data.prompts import prompt_for_row
from bigrec.llm.constrained import constrained_generate
from bigrec.llm.defaults import PRECISION
from bigrec.llm.models import load_model, resolve_base_model, resolve_dtype
from bigrec.llm.trie import Trie, response_ids


def boundary_check(tok, rows: list[dict], titles: list[str]) -> int:
    """Titles whose response tokenises differently after the prompt than alone (0 expected)."""
    prompt_ids = tok(prompt_for_row(rows[0]))["input_ids"]
    prompt = prompt_for_row(rows[0])
    bad = 0
    for title in titles:
        alone = response_ids(tok, title)[:-1]
        if tok(prompt + f'"{title}"')["input_ids"] != prompt_ids + alone:
            bad += 1
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--beams", default="10,50")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--data", default="/tmp/prep/ml-100k")
    parser.add_argument("--precision", default=PRECISION)
    parser.add_argument("--compare_prefill", action="store_true",
                        help="also time transformers' own prefill of every beam's copy of the prompt")
    args = parser.parse_args()
    peaks = measure_peaks()
    print(peaks.line(), flush=True)

    data = Path(args.data)
    if not (data / "test_5000.json").is_file():
        print(f"preparing ml-100k into {data} ...")
        if cli(["prepare", "--dataset", "ml-100k", "--out", str(data)]):
            raise SystemExit("bigrec prepare failed")
    started = time.perf_counter()
    path = resolve_base_model("smollm2-135m")
    model, tok = load_model(path, precision=args.precision, device="cpu", phase="decode")
    prefill_dtype = resolve_dtype(args.precision, "cpu", "prefill")
    print(f"model {path} ({next(model.parameters()).dtype}, {torch.get_num_threads()} threads) "
          f"loaded in {time.perf_counter() - started:.1f}s", flush=True)
    catalog = read_catalog(data / "id2name.txt")
    rows = json.loads((data / "test_5000.json").read_text())[:args.rows]
    started = time.perf_counter()
    trie = Trie.build(tok, catalog.titles)
    print(f"trie: {len(catalog)} items, {len(trie.titles)} distinct titles, {trie.num_nodes} nodes, "
          f"longest path {trie.max_depth} tokens, built in {time.perf_counter() - started:.2f}s")
    print(f"titles tokenised differently in context than alone: {boundary_check(tok, rows, catalog.titles)}")
    prompts = [prompt_for_row(r) for r in rows]
    constrained_generate(model, tok, prompts[:1], trie, num_beams=2, batch_size=1)  # warm-up
    # The length correction is a rescoring of the finished beams: same search, same time.
    for beams in (int(b) for b in args.beams.split(",")):
        for shared in (True, False) if args.compare_prefill else (True,):
            stats: dict = {}
            started = time.perf_counter()
            out = constrained_generate(model, tok, prompts, trie, num_beams=beams, batch_size=args.batch_size,
                                       share_prompt_cache=shared, stats=stats, prefill_dtype=prefill_dtype)
            seconds = time.perf_counter() - started
            valid = all(b.title in catalog.ids_by_title for row in out for b in row)
            top1 = [row[0].title for row in out if row]
            in_processor = stats["processor_seconds"] / stats["generate_seconds"]
            print(f"beams={beams:3d} batch={args.batch_size} shared prompt cache={shared!s:5}: "
                  f"{len(rows)} rows in {seconds:6.1f}s = {len(rows) / seconds:5.2f} rows/s; "
                  f"logits processor {stats['processor_seconds']:.2f}s = {in_processor:5.1%} of generate; "
                  f"beams per row {min(map(len, out))}-{max(map(len, out))}, all titles: {valid}, "
                  f"distinct top-1 {len(set(top1))}/{len(top1)}", flush=True)
            if shared:
                batches = [prompts[lo:lo + args.batch_size] for lo in range(0, len(prompts), args.batch_size)]
                phases = phase_rates(model, tok, batches, [row[0].text if row else "" for row in out], beams,
                                     seconds, prefill_dtype)
                print("    " + "; ".join(
                    f"{name} ({str(dtype).removeprefix('torch.')}) {s:.1f}s, {share(flops / s, peaks, dtype)}"
                    for (name, (s, flops)), dtype in zip(phases.items(), (prefill_dtype, model.dtype), strict=True)),
                      flush=True)


if __name__ == "__main__":
    main()
