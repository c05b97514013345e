"""Likelihood ranking against the baselines of a finished ``bigrec demo`` run, on the same rows.

Ranks the run's validation rows by the model's own title log-probabilities
(``bigrec generate --decoding likelihood``) for each no-history prior weight, picks the weight
with the best validation NDCG@10, ranks the test rows with it, evaluates the language model alone
under both protocols, and prints the demo's side-by-side table and paired differences (few-shot
SASRec, the last title, popularity, full SASRec) with 95% intervals. It also times free beam
search on the first test rows in the same process, for rows/s side by side.

    python benchmarks/bench_likelihood.py --run runs/quality/ml-100k/demo         # the demo's adapter
    python benchmarks/bench_likelihood.py --run runs/quality/ml-100k/demo --adapter DIR --name lora-ep2
    python benchmarks/bench_likelihood.py --run runs/quality/ml-100k/demo --base_model runs/full/ft/snapshots/epoch-1 \
        --layout timeline --data runs/full/data --name full-ep1       # a model trained on timelines
    python benchmarks/bench_likelihood.py ... --name full-ep1 --valid_only   # validation only: choose a snapshot

With ``--layout timeline`` the rows come from ``--data``, a folder prepared with ``--layout timeline``
from the same dataset and seed: its seeded 5,000-row samples hold the demo's rows in the same order
(checked row by row), written as timelines.

Every stage is resumable: generation keeps its progress files, and a finished result or evaluation
whose recorded configuration matches is reused. Asserts nothing; the weight is chosen on validation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from common import K10

from bigrec import io
from bigrec.config import build, to_dict
from bigrec.evaluation.comparison import describe_pairs
from bigrec.evaluation.intervals import paired_difference
from bigrec.evaluation.metrics import TOPK, Ranks, details_ranks
from bigrec.evaluation.report import with_interval
from bigrec.evaluation.results import certified_share
from bigrec.llm.defaults import CANDIDATES, GENERATE_BATCH_SIZE, SEARCH_NODES
from bigrec.llm.layouts import LAYOUTS
from bigrec.stages import demo, evaluate, generate


def fresh(path: Path, cfg) -> bool:
    """Whether ``path`` was written by a run of exactly ``cfg`` (its .config.yaml beside it)."""
    written = path.with_name(path.stem + ".config.yaml")
    return path.is_file() and written.is_file() and yaml.safe_load(written.read_text()) == to_dict(cfg)


def run_generate(cfg: generate.Config) -> tuple[Path, float | None]:
    """(result file, seconds per row, None when reused)."""
    path = Path(cfg.result_json_data)
    if fresh(path, cfg):
        return path, None
    started = time.perf_counter()
    generate.run(cfg)
    rows = len(io.read_json(path))
    return path, (time.perf_counter() - started) / rows


def run_evaluate(cfg: evaluate.Config) -> Path:
    path = Path(cfg.output)
    if not fresh(path, cfg):
        evaluate.run(cfg)
    return path


def lm_alone(run: Path, protocol_suffix: str, input_dir: Path, output: Path) -> evaluate.Config:
    """The demo's evaluation settings for this protocol, without re-weighting: the language model alone.
    Read from its free decoding's evaluation, or its likelihood ranking's in a run without one."""
    stages = [run / "stages" / f"evaluate_{decoding}{protocol_suffix}.json" for decoding in ("free", "likelihood")]
    stage = next((path for path in stages if path.is_file()), None)
    if stage is None:
        raise SystemExit(f"{run}: no finished evaluate_free{protocol_suffix} or evaluate_likelihood{protocol_suffix} stage")
    settings = json.loads(stage.read_text())["settings"]
    drop = {"popularity", "ci_scores", "valid_ci_scores", "valid_input_dir", "compare", "report"}
    kept = {k: v for k, v in settings.items() if k not in drop}
    return build(evaluate.Config, {**kept, "input_dir": str(input_dir), "output": str(output)})


def row_identity(row: dict) -> list:
    """User, target and history: what makes two rows the same row, in either layout (their
    prompts and answers are written differently)."""
    return [row.get(key) for key in ("user_id", "item_id", "history_item_id")]


def other_ranks(folder: Path, suffix: str, test_rows: list[dict]) -> Ranks:
    """The target ranks of another result of this script (its chosen setting's test evaluation,
    under the protocol of ``suffix``), after checking that it ranked the same rows."""
    chosen = io.read_json(folder / "summary.json")["chosen"]
    theirs = io.read_json(folder / "test" / chosen / "test.json")
    if [row_identity(r) for r in theirs] != [row_identity(r) for r in test_rows]:
        raise SystemExit(f"--compare {folder}: its test rows are not this run's")
    return details_ranks(io.read_json(folder / "test" / chosen / f"metrics{suffix}.details.json")["files"]["test.json"],
                         "test.json")


def same_rows(demo_rows: Path, other: Path | None, dst: Path, n: int) -> None:
    """The first ``n`` of the demo's rows into ``dst``; from ``other`` (the same rows in another layout)
    when given, after checking that user, target and history agree row by row."""
    if other is None:
        demo.first_rows(demo_rows, dst, n)
        return
    theirs, ours = io.read_json(demo_rows)[:n], io.read_json(other)[:n]
    for pos, (a, b) in enumerate(zip(theirs, ours, strict=False)):
        if row_identity(a) != row_identity(b):
            raise SystemExit(f"{other}: row {pos} is not the demo's row {pos} of {demo_rows} (user, target or "
                             "history differ); prepare it from the same dataset with the same seed")
    if len(ours) < min(n, len(theirs)):
        raise SystemExit(f"{other}: {len(ours)} rows, fewer than the {min(n, len(theirs))} needed")
    io.write_json_rows(dst, ours)


def table_row(label: str, metrics: dict, iv: dict | None) -> str:
    cells = [with_interval(metrics[key][K10], iv["ci"][key][K10] if iv else None) for key in ("NDCG", "HR")]
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/quality/ml-100k/demo", help="a finished bigrec demo run folder")
    parser.add_argument("--adapter", default=None, help="adapter to rank with (default: the run's own)")
    parser.add_argument("--base_model", default=None, help="a full fine-tuned model folder instead of an adapter")
    parser.add_argument("--name", default="demo", help="folder name of this model's results")
    parser.add_argument("--out", default="runs/likelihood/{run}", help="results folder pattern")
    parser.add_argument("--knobs", default="w0,w0-new,w1-new",
                        help="settings tried on validation: wW is likelihood ranking with --prior_weight W, "
                             "constrained is constrained beam search (10 beams); -new adds --exclude_history")
    parser.add_argument("--valid_rows", type=int, default=500, help="validation rows that choose the weight")
    parser.add_argument("--test_rows", type=int, default=None, help="only the first N test rows (default: all; "
                                                                   "a claim needs at least 2,000)")
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="generate --candidates")
    parser.add_argument("--search_nodes", type=int, default=SEARCH_NODES, help="generate --search_nodes")
    parser.add_argument("--layout", default="window", choices=list(LAYOUTS),
                        help="the layout the model was trained on")
    parser.add_argument("--data", default=None, help="--layout timeline: the timeline-prepared data folder")
    parser.add_argument("--batch_size", type=int, default=GENERATE_BATCH_SIZE, help="generate --batch_size")
    parser.add_argument("--beam_rows", type=int, default=64, help="test rows timed with free beam search (0: none)")
    parser.add_argument("--valid_only", action="store_true",
                        help="rank the validation rows only and write valid_summary.json (to choose between "
                             "snapshots before one is tested; a later run with the same --name reuses the ranking)")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=FOLDER",
                        help="pair the test ranks with another result of this script on the same rows (e.g. "
                             "full-ep2=runs/likelihood/demo/full-ep2); repeatable")
    args = parser.parse_args()
    compare = dict(item.partition("=")[::2] for item in args.compare)
    for name, folder in compare.items():
        if not (Path(folder) / "summary.json").is_file():
            parser.error(f"--compare {name}={folder}: no finished result there (no summary.json)")
    run = Path(args.run)
    if (args.layout == "timeline") != (args.data is not None):
        parser.error("--layout timeline and --data go together")
    if not (run / "run.yaml").is_file():
        parser.error(f"--run {run}: no finished bigrec demo run there (no run.yaml); run `bigrec demo --run_dir "
                     f"{run} --test_rows 2000 --valid_rows 500` first")
    out = Path(args.out.format(run=run.name)) / args.name
    manifest = yaml.safe_load((run / "run.yaml").read_text())
    base = args.base_model or str((run / manifest["base_model"]) if (run / str(manifest["base_model"])).is_dir()
                                  else manifest["base_model"])
    adapter = None if args.base_model else (args.adapter or str(run / "adapter"))
    catalog = str(run / "data" / "id2name.txt")
    common = dict(base_model=base, lora_weights=adapter, decoding="likelihood", catalog=catalog, layout=args.layout,
                  candidates=args.candidates, search_nodes=args.search_nodes, batch_size=args.batch_size)
    sample = out / "inputs" / f"valid_{args.valid_rows}.json"
    if not sample.is_file():
        same_rows(run / "inputs" / "valid.json", args.data and Path(args.data) / "valid_5000.json", sample,
                  args.valid_rows)

    speeds: dict[str, float] = {}
    chosen: dict[str, float] = {}
    knobs = {}
    for name in args.knobs.split(","):
        if name.startswith("constrained"):  # catalogue-constrained beam search, 10 beams
            knobs[name] = {"decoding": "constrained", "num_beams": 10, "exclude_history": name.endswith("-new")}
            continue
        weight, new = name.removeprefix("w").removesuffix("-new"), name.endswith("-new")
        knobs[name] = {"prior_weight": float(weight), "exclude_history": new}
    for name, knob in knobs.items():
        folder = out / "valid" / name
        cfg = build(generate.Config, {**common, **knob, "test_data_path": str(sample),
                                      "result_json_data": str(folder / "valid.json")})
        _, per_row = run_generate(cfg)
        if per_row is not None:
            speeds[f"likelihood, {name} (validation)"] = 1 / per_row
        metrics = run_evaluate(lm_alone(run, "", folder / "valid.json", folder / "metrics.json"))
        chosen[name] = io.read_json(metrics)["valid.json"]["NDCG"][K10]
        print(f"validation, {name}: NDCG@10 {chosen[name]:.4f}", flush=True)
    best = max(chosen, key=lambda name: chosen[name])
    print(f"{best} chosen on {args.valid_rows} validation rows", flush=True)
    if args.valid_only:
        io.write_json(out / "valid_summary.json", {"validation_ndcg10": chosen, "chosen": best,
                                                   "valid_rows": args.valid_rows, "rows_per_second": speeds})
        return

    folder = out / "test" / best
    test_path = run / "inputs" / "test.json"
    if args.test_rows or args.data:
        test_path = out / "inputs" / f"test_{args.test_rows or 'all'}.json"
        if not test_path.is_file():
            same_rows(run / "inputs" / "test.json", args.data and Path(args.data) / "test_5000.json", test_path,
                      args.test_rows or len(io.read_json(run / "inputs" / "test.json")))
    cfg = build(generate.Config, {**common, **knobs[best], "test_data_path": str(test_path),
                                  "result_json_data": str(folder / "test.json")})
    _, per_row = run_generate(cfg)
    if per_row is not None:
        speeds[f"likelihood, {best} (test)"] = 1 / per_row
    if args.beam_rows:
        demo.first_rows(test_path, out / "inputs" / "beam_rows.json", args.beam_rows)
        beam = build(generate.Config, {"base_model": base, "lora_weights": adapter, "batch_size": 16,
                                       "layout": args.layout,
                                       "test_data_path": str(out / "inputs" / "beam_rows.json"),
                                       "result_json_data": str(out / "beam" / "test.json")})
        started = time.perf_counter()
        generate.run(beam)
        speeds["free beam search, 4 beams (same process)"] = args.beam_rows / (time.perf_counter() - started)

    test_rows = io.read_json(test_path)
    label = "constrained" if knobs[best].get("decoding") == "constrained" else "likelihood"
    sample_size = yaml.safe_load((run / "config.yaml").read_text()).get("sample", 1024) \
        if (run / "config.yaml").is_file() else 1024
    summary: dict = {"validation_ndcg10": chosen, "chosen": best, "knobs": knobs[best], "rows_per_second": speeds, "protocols": {}}
    for protocol, suffix in demo.PROTOCOLS.items():
        metrics = run_evaluate(lm_alone(run, suffix, folder / "test.json", folder / f"metrics{suffix}.json"))
        part = demo.side_by_side(run, test_rows, {label: metrics}, sample_size, None)
        infos = part.pop("infos")
        summary["protocols"][protocol] = part
        print(f"\n### {protocol} protocol, {len(test_rows)} test rows: NDCG@10 / HR@10 with 95% intervals\n")
        print("| run | NDCG@10 | HR@10 |\n|---|---|---|")
        for run_label, m in part["metrics"].items():
            print(table_row(run_label, m, part["intervals"].get(run_label)))
        print()
        for line in describe_pairs(part["paired"]):
            print(f"- {line}")
        free = run / "metrics" / f"bigrec_free{suffix}.details.json"
        if free.is_file() and args.test_rows is None:  # the demo's free decoding on the same rows
            ranks = details_ranks(io.read_json(free)["files"]["test.json"], "test.json")
            diff = paired_difference(details_ranks(infos[label], "test.json"), ranks, TOPK)
            pair = f"BIGRec ({label}) minus BIGRec (free decoding, the demo's)"
            part["paired"][pair] = diff
            print(f"- {describe_pairs({pair: diff})[0]}")
        for name, other in compare.items():
            diff = paired_difference(details_ranks(infos[label], "test.json"),
                                     other_ranks(Path(other), suffix, test_rows), TOPK)
            pair = f"BIGRec ({label}) minus {name}"
            part["paired"][pair] = diff
            print(f"- {describe_pairs({pair: diff})[0]}")
        diag = infos[label].get("diagnostics") or {}
        if diag:
            print(f"- diagnostics: {json.dumps(diag)[:400]}")
    results = io.read_json(folder / "test.json")
    tops = [r["predict"][0] for r in results]
    summary["distinct_top1"] = len(set(tops)) / len(tops)
    print(f"\ndistinct top-1 titles: {summary['distinct_top1']:.1%}")
    if label == "likelihood":
        summary["certified_top10"] = certified_share(results)
        print(f"top 10 certified exact in {summary['certified_top10']:.1%} of rows")
    for name, value in speeds.items():
        print(f"rows/s, {name}: {value:.2f}")
    io.write_json(out / "summary.json", summary)


if __name__ == "__main__":
    main()
