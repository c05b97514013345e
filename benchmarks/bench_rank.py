"""Likelihood ranking's speed: the trie search as it runs now against the same search with each of its
attention changes turned off, at node budgets, beside the reference recipe's beam search on the same
rows; prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_rank.py --run runs/quality/ml-100k/demo [--rows 16] [--nodes 512,3072]
        [--repeats 2] [--ref_rows 8] [--tree_from 1024] [--base_model smollm2-135m]

The rows are the first ``--rows`` of the run's validation rows (``inputs/valid.json``, the window
layout); a run folder without an adapter ranks with the base model. The model is loaded as ``bigrec
generate --decoding likelihood`` loads it (weights in the prefill's dtype: bf16 where the CPU has it
natively, at precision auto), and :meth:`bigrec.llm.likelihood.TitleScorer.rank` ranks the top 20 of
every row in one batch, no prior, no titles left out. Three attentions, alternating ``--repeats``
times in this process for each budget:

* ``plain``: transformers' SDPA (each key/value head repeated for its query heads) under a dense mask;
* ``packed``: :func:`bigrec.llm.likelihood._packed_gqa_sdpa` (``TitleScorer.packed_gqa``), dense mask;
* ``now``: packed, attending through the gathered ancestors once ``--tree_from`` nodes are fed
  (``TitleScorer.tree_attention``): the scorer's defaults.

The best time of each is printed, the ratio now / plain, and how many rows' top 20 and top 10 agree
with plain's (bf16 rounding moves a budget-cut ranking; in fp32 they agree but for near ties).

The reference recipe (BIGRec's ``inference.py``, restated in ``bench_generate.py``: fp32, the adapter
unmerged, 4 beams, ``--ref_max_new_tokens``, no stopping criteria) decodes the first ``--ref_rows``
of the same rows, and the ranking's rows/s prints as a ratio against it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_generate import reference_generate, reference_model

from bigrec.llm.defaults import DEMO_SEARCH_NODES, PRECISION, SEARCH_NODES

SETTINGS = ("plain", "packed", "now")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished bigrec demo run folder (adapter, data, inputs)")
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--precision", default=PRECISION)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--nodes", default=f"{DEMO_SEARCH_NODES},{SEARCH_NODES}",
                        help="search budgets (title tokens a row), comma-separated: the demo's and generate's")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each attention per budget")
    parser.add_argument("--tree_from", type=int, default=None, help="nodes fed before tree attention (the scorer's default)")
    parser.add_argument("--ref_rows", type=int, default=8, help="rows the reference recipe decodes (0: skip it)")
    parser.add_argument("--ref_batch_size", type=int, default=8)
    parser.add_argument("--ref_max_new_tokens", type=int, default=128)
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from bigrec.data.catalog import read_catalog
    from bigrec.llm.layouts import get_layout
    from bigrec.llm.likelihood import TitleScorer
    from bigrec.llm.models import load_model, resolve_base_model, resolve_dtype

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    run = Path(args.run)
    adapter = str(run / "adapter") if (run / "adapter" / "adapter_config.json").is_file() else None
    base = resolve_base_model(args.base_model)
    rows = json.loads((run / "inputs" / "valid.json").read_text())[:args.rows]
    layout = get_layout("window")
    prompts = [layout.prompt(r) for r in rows]
    model, tok = load_model(base, args.precision, adapter, device="cpu", phase="prefill")
    catalog = read_catalog(run / "data" / "id2name.txt")
    scorer = TitleScorer(model, tok, layout.trie(tok, catalog.titles),
                         autocast=resolve_dtype(args.precision, "cpu", "prefill"), batch_size=len(prompts))
    if args.tree_from is not None:
        scorer.tree_from = args.tree_from
    print(f"model {base}, adapter {adapter or 'none'}; {len(rows)} rows, {len(catalog.titles)} titles; "
          f"weights {str(next(model.parameters()).dtype).removeprefix('torch.')}; tree attention "
          f"{'from ' + str(scorer.tree_from) + ' fed nodes' if scorer.tree_attention else 'unavailable (dense only)'}; "
          f"{torch.get_num_threads()} threads", flush=True)
    scorer.rank(prompts[:1], 20, max_nodes=64)  # warm-up
    packed, tree = scorer.packed_gqa, scorer.tree_attention  # what this model and device allow

    results = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        best: dict[str, float] = {}
        rankings = {}
        for _ in range(args.repeats):
            for name in SETTINGS:
                scorer.packed_gqa = packed and name != "plain"
                scorer.tree_attention = tree and name == "now"
                start = time.perf_counter()
                rankings[name] = scorer.rank(prompts, 20, max_nodes=nodes)
                best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / len(prompts))
        same = {name: (sum(a.leaves == b.leaves for a, b in zip(rankings["plain"], rankings[name], strict=True)),
                       sum(a.leaves[:10] == b.leaves[:10] for a, b in zip(rankings["plain"], rankings[name], strict=True)))
                for name in SETTINGS[1:]}
        results.append((nodes, best, same))
        print(f"  {nodes} nodes: " + ", ".join(f"{name} {best[name]:.3f}" for name in SETTINGS) + " s a row", flush=True)
    del model, scorer

    ref_rps = None
    if args.ref_rows:
        ref_model, ref_tok = reference_model(base, adapter)
        ref_prompts = prompts[:args.ref_rows]
        start = time.perf_counter()
        for lo in range(0, len(ref_prompts), args.ref_batch_size):
            reference_generate(ref_model, ref_tok, ref_prompts[lo:lo + args.ref_batch_size], 4, args.ref_max_new_tokens)
        ref_rps = len(ref_prompts) / (time.perf_counter() - start)

    head = (f"{'nodes':>6} {'plain s/row':>11} {'packed s/row':>12} {'now s/row':>9} {'now/plain':>9} "
            f"{'same top 20 (packed, now)':>25} {'same top 10 (packed, now)':>25}")
    if ref_rps:
        head += f" {'now vs reference':>16}"
    print("\n" + head + "\n" + "-" * len(head))
    for nodes, best, same in results:
        line = (f"{nodes:>6} {best['plain']:>11.3f} {best['packed']:>12.3f} {best['now']:>9.3f} "
                f"{best['plain'] / best['now']:>8.2f}x {same['packed'][0]:>8}, {same['now'][0]:>3} of {len(rows):<8} "
                f"{same['packed'][1]:>8}, {same['now'][1]:>3} of {len(rows):<8}")
        if ref_rps:
            line += f" {1 / best['now'] / ref_rps:>15.2f}x"
        print(line)
    if ref_rps:
        print(f"reference recipe (4 beams, {args.ref_max_new_tokens} new tokens, fp32): {ref_rps:.3f} rows/s "
              f"on {min(args.ref_rows, len(rows))} rows")


if __name__ == "__main__":
    main()
