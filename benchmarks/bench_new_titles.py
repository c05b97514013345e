"""Recommend something new: `generate --exclude_history` against plain decoding and the last title.

A tuned model often answers with a title from the user's own history (on Amazon most of its
top-1 answers do), and grounding that copy finds the items next to the last purchase, which the
last-title baseline gets with no language model. ``--exclude_history`` never returns a history
title: constrained decoding masks the trie's last edge into each of the row's history titles;
free decoding drops the beams that copy one and reruns a row of copies with more beams.

For one adapter and one set of rows (validation rows: this decides a default) this generates
with free and constrained decoding, each plain and with ``--exclude_history``, grounds them
the same way, and ranks under both protocols (the reference's, every item ranked, and each
user's seen items left out). It prints NDCG@10 / HR@10 with 95% bootstrap intervals, the
share of top-1 answers that copy a history title, and the paired differences on the same
rows: each ``--exclude_history`` variant minus its plain decoding, and minus the last-title
baseline. Finished generations are kept (``--out``), so a rerun only evaluates.

    python benchmarks/bench_new_titles.py \\
        --adapter runs/curve/ml-100k-seed42/demo-long/train/snapshots/epoch-1 \\
        --rows runs/curve/ml-100k-seed42/inputs/valid_1000.json --data runs/curve/ml-100k-seed42/data \\
        --index runs/curve/ml-100k-seed42/index.safetensors --out runs/new_titles/ml-100k

Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import K10

from bigrec import io
from bigrec.evaluation.metrics import TOPK, details_ranks
from bigrec.evaluation.report import with_interval
from bigrec.evaluation.runs import find_run
from bigrec.llm.defaults import NUM_BEAMS

VARIANTS = {  # file stem -> (decoding, exclude_history)
    "free": ("free", False),
    "free_new": ("free", True),
    "constrained": ("constrained", False),
    "constrained_new": ("constrained", True),
}
PROTOCOLS = {"reference": False, "seen items left out": True}
LAST = "last history title"


def generate_all(args, results: Path) -> None:
    from bigrec.stages import generate

    for stem, (decoding, exclude) in VARIANTS.items():
        path = results / f"{stem}.json"
        if path.is_file():
            continue
        started = time.perf_counter()
        generate.run(generate.Config(
            test_data_path=args.rows, result_json_data=str(path), base_model=args.base_model,
            lora_weights=args.adapter, num_beams=args.num_beams, decoding=decoding, exclude_history=exclude,
            catalog=str(Path(args.data) / "id2name.txt") if decoding == "constrained" or exclude else None))
        print(f"[{stem}] generated in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


def evaluate_all(args, results: Path, out: Path) -> dict[str, dict]:
    """Per protocol: {run name: {"ranks": Ranks, "copies": share or None}}."""

    from bigrec.stages import evaluate

    found = {}
    for protocol, exclude in PROTOCOLS.items():
        metrics = out / f"metrics{'_unseen' if exclude else ''}.json"
        details = metrics.with_name(metrics.stem + ".details.json")
        if not details.is_file():
            evaluate.run(evaluate.Config(catalog=str(Path(args.data) / "id2name.txt"), input_dir=str(results),
                                         output=str(metrics), base_model=args.base_model, index_path=args.index,
                                         last_title=True, exclude_history=exclude, pooling="mean",
                                         embed_layer=-1, title_text="natural"))  # the demo's grounding
        runs = {}
        for name, info in io.read_json(details)["files"].items():
            stem = Path(name).stem
            runs[stem] = {"ranks": details_ranks(info, find_run(info, ranking="plain")),
                          "copies": info["diagnostics"]["history_copy_top1_share"]}
            if LAST not in runs:  # every file ranks the same rows by their last title: once is enough
                runs[LAST] = {"ranks": details_ranks(info, find_run(info, ranking="last_title")), "copies": None}
        found[protocol] = runs
    return found


def report(found: dict[str, dict], rows: int) -> None:
    from bigrec.evaluation.intervals import bootstrap_ci, paired_difference
    from bigrec.evaluation.metrics import ndcg_hr

    for protocol, runs in found.items():
        print(f"\n### {protocol} ({rows} rows)\n\n| run | NDCG@10 [95% CI] | HR@10 [95% CI] | top-1 copies a history title |")
        print("|---|---|---|---|")
        for name in [*VARIANTS, LAST]:
            if name not in runs:
                continue
            ranks = runs[name]["ranks"]
            m, ci = ndcg_hr(ranks, TOPK), bootstrap_ci(ranks, TOPK)
            copies = "" if runs[name]["copies"] is None else f"{runs[name]['copies']:.1%}"
            print(f"| {name} | {with_interval(m['NDCG'][K10], ci['NDCG'][K10])} | "
                  f"{with_interval(m['HR'][K10], ci['HR'][K10])} | {copies} |")
        print("\nPaired NDCG@10 on the same rows:")
        for new, plain in (("free_new", "free"), ("constrained_new", "constrained")):
            for other in (plain, LAST):
                if new in runs and other in runs:
                    d = paired_difference(runs[new]["ranks"], runs[other]["ranks"], TOPK)["NDCG"]
                    low, high = d["ci"][K10]
                    verdict = "better" if low > 0 else "worse" if high < 0 else "no difference at 95%"
                    print(f"- {new} minus {other}: {d['diff'][K10]:+.4f} [{low:+.4f}, {high:+.4f}] ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="the tuned adapter (a train output or snapshot)")
    parser.add_argument("--rows", required=True, help="instruction rows to generate for (validation rows)")
    parser.add_argument("--data", required=True, help="the prepared data folder (id2name.txt)")
    parser.add_argument("--index", required=True, help="the item index (built if missing)")
    parser.add_argument("--out", required=True, help="folder for generations and metrics (reused by a rerun)")
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--num_beams", type=int, default=NUM_BEAMS)
    parser.add_argument("--reuse", action="append", default=[], metavar="VARIANT=RESULT",
                        help="a finished generation of a variant with the same settings (copied, not rerun)")
    args = parser.parse_args()
    out = Path(args.out)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    for item in args.reuse:
        stem, _, path = item.partition("=")
        if stem not in VARIANTS:
            parser.error(f"--reuse {item}: unknown variant {stem!r}; known: {', '.join(VARIANTS)}")
        if not (results / f"{stem}.json").is_file():
            io.write_json(results / f"{stem}.json", io.read_json(path))
    generate_all(args, results)
    report(evaluate_all(args, results, out), len(io.read_json(args.rows)))


if __name__ == "__main__":
    main()
