"""BIGRec recipes against the paper's baselines on the same test rows, with 95% intervals.

For each recipe (a set of ``bigrec demo`` options) this trains, generates, grounds and
evaluates with ``bigrec demo`` (free decoding; a rerun reuses every finished stage), then
prints one table per ranking protocol (the reference one, and each user's seen items left
out): NDCG@10 and HR@10 with bootstrap intervals for BIGRec, BIGRec + CI (the paper's
formula and the weighted-sum variant), SASRec on all training rows, SASRec on the same
sampled rows BIGRec is tuned on, popularity and the last-history-title content baseline;
then the paired differences the paper's claims rest on (T1: BIGRec minus few-shot SASRec and
minus the content baseline; T2: BIGRec minus popularity; T3: BIGRec + CI minus full SASRec).
Evaluation-only variants (``--variants``, e.g. grounding the nearest of four beams) are
evaluated on each recipe's generations with the gamma or weight chosen on validation.

    python benchmarks/bench_quality.py                                   # ml-100k, 2,000 test rows
    python benchmarks/bench_quality.py --dataset d3 --source ../shared/data/amazon-industrial
    python benchmarks/bench_quality.py --adapter demo-long-ep1=runs/curve/ml-100k-seed42/demo-long/train/snapshots/epoch-1
    python benchmarks/bench_quality.py --recipes "" --seed 0 --data_seed 42 \
        --adapter seed0=runs/curve/ml-100k-seed0/demo-long/train/snapshots/epoch-1   # another seed, same rows

Asserts nothing; every knob is chosen on the validation rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml
from common import K10

from bigrec import io
from bigrec.config import ConfigError, build, load_yaml, to_dict
from bigrec.evaluation.comparison import describe_pairs
from bigrec.evaluation.report import with_interval
from bigrec.stages import demo, evaluate

# A recipe is "demo" (the demo's defaults: 1,024 examples, one epoch at batch 16, lr 5e-4, loss on
# the response only) or a demo config, shipped (src/bigrec/configs: demo-4096, demo-2ep,
# demo-natural, paper; `bigrec demo --config NAME` runs the same) or a YAML file's path.
RECIPES: dict[str, dict] = {"demo": {}}


def recipe(name: str) -> dict:
    if name not in RECIPES:
        RECIPES[name] = load_yaml(name)
    return RECIPES[name]

VARIANTS = {"nearest of 4 beams": {"ground_beams": 4}}


def recipe_dir(name: str, args) -> Path:
    given = dict(item.split("=", 1) for item in args.recipe_dir)
    return Path(given.get(name) or args.run_dir.format(dataset=args.dataset, recipe=name))


def seed_from(first: Path, run_dir: Path) -> None:
    """A recipe that only brings its own adapter starts from a copy of the first recipe's finished
    folder: its data, inputs, index and baselines are reused (their stage records match), and only
    the adapter's copy, generation and evaluation run."""
    import shutil

    if run_dir.exists() or not (first / "stages").is_dir():
        return
    shutil.copytree(first, run_dir, ignore=lambda folder, names: [
        n for n in names if Path(folder) == first and n in {"adapter", "results", "metrics", "report.md",
                                                             "report.html", "run.yaml"}])


def run_recipe(name: str, args, over: dict, first: Path | None = None) -> demo.Config:
    run_dir = recipe_dir(name, args)
    if "adapter" in over and first is not None:
        seed_from(first, run_dir)
    values = dict(run_dir=str(run_dir), dataset=args.dataset, source=args.source, decoding="free",
                  test_rows=args.test_rows, valid_rows=args.valid_rows, seed=args.seed, data_seed=args.data_seed)
    cfg = build(demo.Config, {**values, **over, **args.settings}, "bench_quality")
    started = time.perf_counter()
    demo.run(cfg)
    print(f"[{name}] {run_dir} ready in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return cfg


def variant_comparison(run_dir: Path, name: str, options: dict, sample: int) -> dict:
    """The recipe's evaluation rerun with ``options``, compared like the demo compares (both protocols)."""
    test_rows = io.read_json(run_dir / "inputs" / "test.json")
    out = {}
    for protocol, suffix in demo.PROTOCOLS.items():
        settings = json.loads((run_dir / "stages" / f"evaluate_free{suffix}.json").read_text())["settings"]
        path = run_dir / "metrics" / "variants" / f"{name.replace(' ', '_')}{suffix}.json"
        cfg = evaluate.Config(**{**settings, **options, "output": str(path)})
        written = path.with_name(path.stem + ".config.yaml")  # evaluate writes its config beside its output
        if not (path.is_file() and written.is_file() and yaml.safe_load(written.read_text()) == to_dict(cfg)):
            evaluate.run(cfg)
        out[protocol] = demo.side_by_side(run_dir, test_rows, {"free": path}, sample, None)
        out[protocol].pop("infos")
    return out


def row(label: str, metrics: dict, iv: dict | None) -> str:
    cells = []
    for key in ("NDCG", "HR"):
        value = metrics[key][K10]
        cells.append(with_interval(value, iv["ci"][key][K10] if iv else None))
    return f"| {label} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k", help="bigrec prepare --dataset (d3 for Amazon Industrial)")
    parser.add_argument("--source", default=None, help="bigrec prepare --source")
    parser.add_argument("--recipes", default="demo", help="comma-separated: demo, or demo configs (shipped names such "
                                                           "as demo-4096, demo-2ep, demo-natural, paper, or paths)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="evaluation-only variants, comma-separated "
                                                                       "('' for none)")
    parser.add_argument("--test_rows", type=int, default=2000, help="test rows (at least 2,000 for a claim)")
    parser.add_argument("--valid_rows", type=int, default=500, help="validation rows for gamma and the weights")
    parser.add_argument("--seed", type=int, default=42, help="demo --seed: the training rows' draw, training, SASRec")
    parser.add_argument("--data_seed", type=int, default=None,
                        help="demo --data_seed: which test and validation rows (default --seed); keep it at 42 "
                             "to compare seeds on the same rows")
    parser.add_argument("--run_dir", default="runs/quality/{dataset}/{recipe}", help="run folder pattern")
    parser.add_argument("--recipe_dir", action="append", default=[], metavar="RECIPE=DIR",
                        help="this recipe's run folder instead of the pattern's (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a bigrec demo option for every recipe (e.g. base_model=PATH), over the recipe's own")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="a recipe NAME that scores an adapter trained elsewhere (a learning-curve snapshot) "
                             "with the demo's other settings, in a copy of the first recipe's folder (repeatable)")
    args = parser.parse_args()
    for item in args.adapter:
        name, _, path = item.partition("=")
        if not (name and path) or name in RECIPES:
            parser.error(f"--adapter {item}: expected NAME=PATH with a NAME that is not a recipe")
        RECIPES[name] = {"adapter": path}
        args.recipes += f",{name}"
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected KEY=VALUE")
    args.settings = dict(item.split("=", 1) for item in args.set)
    recipes = [r for r in args.recipes.split(",") if r]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant: {', '.join(unknown)}")
    for name in recipes:
        try:
            recipe(name)
        except ConfigError as exc:
            parser.error(f"recipe {name}: {exc}")

    results: dict[str, dict] = {}  # "recipe" or "recipe, variant" -> comparison per protocol
    for name in recipes:
        cfg = run_recipe(name, args, recipe(name), first=recipe_dir(recipes[0], args))
        run_dir, sample = Path(cfg.run_dir), cfg.sample
        results[name] = json.loads((run_dir / "metrics" / "comparison.json").read_text())["protocols"]
        for variant in variants:
            results[f"{name}, {variant}"] = variant_comparison(run_dir, variant, VARIANTS[variant], sample)

    print(f"\n{args.dataset}: {args.test_rows} test rows, free decoding; NDCG@10 / HR@10 with 95% bootstrap "
          "intervals (1,000 resamples)")
    for protocol, title in (("reference", "reference protocol"), ("unseen", "seen items left out")):
        print(f"\n### {title}\n\n| run | NDCG@10 | HR@10 |\n|---|---|---|")
        base = results[recipes[0]][protocol]
        for label in [n for n in base["metrics"] if not n.startswith("BIGRec")]:
            print(row(label, base["metrics"][label], base["intervals"].get(label)))
        for name, parts in results.items():
            part = parts[protocol]
            for label in [n for n in part["metrics"] if n.startswith("BIGRec")]:
                print(row(f"{name}: {label}", part["metrics"][label], part["intervals"].get(label)))
        print()
        for name, parts in results.items():
            for line in describe_pairs(parts[protocol]["paired"]):
                print(f"- {name}: {line}")


if __name__ == "__main__":
    main()
