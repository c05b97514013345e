"""Learning curves: BIGRec's validation quality against its training budget, one run per recipe.

Each recipe is one ``bigrec train`` run whose learning-rate schedule is planned over its whole
length (``--num_epochs``). The run pauses at each curve point (``--stop_after_epoch``), where a
snapshot of the adapter is saved with its early-stopping loss and the wall and CPU time spent on
training and validation so far. Each snapshot is then scored on the same validation rows (1,000
by default): the loss on the response only, NDCG@10 and HR@10 of free decoding + grounding with
95% bootstrap intervals, and the shares of distinct top-1 generations, exact catalogue titles and
copies of a history title. The run then continues from its checkpoint with the same schedule and
data order. It ends where early stopping ends it (that point, the restored best adapter, is
scored too), at the last point, or when validation NDCG@10 has not improved over two doublings
of the budget. Few-shot SASRec (on the same sampled rows), popularity and the last history title
are scored on the same rows and drawn as horizontal lines.

Everything is kept under ``--run_dir``; a killed run resumes where it stopped, so one curve can
span several sessions. The data, the scoring rows, the index, each baseline and each point are
keyed like the demo's stages (``--run_dir``/stages, :class:`bigrec.runner.StageRunner`): a rerun
skips what is up to date and redoes what a changed option touches (``--num_beams`` rescoring
every point, ``--sasrec_epochs`` retraining SASRec), never reusing work done otherwise. Training
keys itself: ``bigrec train`` refuses to continue a run with other settings or other rows.

    python benchmarks/bench_learning_curve.py --recipes demo-long           # ml-100k, seed 42
    python benchmarks/bench_learning_curve.py --recipes demo-long --seed 0 --points 1 --train_only
    python benchmarks/bench_learning_curve.py --recipes demo-long,paper --report_only
    python benchmarks/bench_learning_curve.py --recipes paper --score_only   # score snapshots, train nothing

Prints a table and writes ``curve.png`` (validation NDCG@10 against wall-minutes) and
``curve.json`` in ``--run_dir``. Asserts nothing; the test rows are never read.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from common import K10

from bigrec import io
from bigrec.config import ConfigError, build, load_yaml
from bigrec.evaluation.metrics import TOPK, details_ranks
from bigrec.evaluation.report import with_interval
from bigrec.evaluation.runs import find_run
from bigrec.llm.defaults import NUM_BEAMS
from bigrec.runner import StageRunner
from bigrec.stages import demo

log = logging.getLogger("bench_learning_curve")

# A recipe is a demo config: "demo" (the demo's defaults: batch 16, lr 5e-4, loss on the response
# only, one epoch), a shipped one (src/bigrec/configs: demo-long and demo-long-prompt plan the
# demo's schedule over up to 50 epochs; paper and paper-response are the reference train.py's
# batch 128, lr 1e-4, 20 warm-up steps, group_by_length) or a YAML file's path. The curve trains
# with its TRAINING settings, so `bigrec demo --config NAME` trains the same way. Early stopping
# (patience 5) watches the validation loss of ``val_rows`` rows: the reference uses its 5,000-row
# validation file, but here an evaluation of 5,000 rows would cost more than the epoch it follows.
KNOWN = ("demo", "demo-long", "demo-long-prompt", "paper", "paper-response")
TRAINING = ("batch_size", "micro_batch_size", "learning_rate", "warmup_steps", "train_on_inputs", "group_by_length",
            "num_epochs", "early_stopping_patience", "val_rows")


def recipe(name: str, sample: int, overrides: dict | None = None) -> dict:
    """The training settings of recipe ``name`` for ``sample`` training rows, ``overrides`` (a
    ``--set`` mapping of TRAINING keys, strings allowed) on top; the demo's warm-up rule resolved."""
    unknown = sorted(set(overrides or {}) - set(TRAINING))
    if unknown:
        raise ConfigError(f"unknown recipe setting(s) {', '.join(unknown)}; known: {', '.join(TRAINING)}")
    values = {} if name == "demo" else load_yaml(name)
    cfg = build(demo.Config, {**values, **(overrides or {}), "sample": sample}, f"recipe {name}")
    return {**{key: getattr(cfg, key) for key in TRAINING}, "warmup_steps": demo.warmup_steps(cfg)}


POINTS = (1, 2, 4, 8, 16, 32, 50)


class Curve:
    """One dataset's shared pieces (prepared data, scoring rows, index, baselines) under ``root``."""

    def __init__(self, args):
        self.args = args
        self.root = Path(args.run_dir)
        self.data = self.root / "data"
        self.rows_path = self.root / "inputs" / f"valid_{args.valid_rows}.json"
        self.index = self.root / "index.safetensors"
        self.stages = StageRunner(self.root)

    def grounding(self) -> dict:
        return {"pooling": "mean", "embed_layer": -1, "title_text": "natural"}  # the demo's

    def prepare(self) -> None:
        """Data, scoring rows and item index, each redone when a setting it depends on changes
        (the demo's stage records under ``root/stages``: a changed option never reuses old work)."""
        from bigrec.stages import index, prepare

        args = self.args

        def scoring_rows() -> None:
            io.write_json_rows(self.rows_path, io.read_json(self.data / "valid_5000.json")[: args.valid_rows])

        self.stages.run("prepare", {"dataset": args.dataset, "source": args.source, "seed": args.data_seed},
                        [self.data / "valid_5000.json"],
                        lambda: prepare.run(prepare.Config(dataset=args.dataset, out=str(self.data),
                                                           source=args.source, seed=args.data_seed)))
        self.stages.run("rows", {"valid_rows": args.valid_rows}, [self.rows_path], scoring_rows, after=("prepare",))
        self.stages.run("index", {"base_model": args.base_model, **self.grounding()}, [self.index],
                        lambda: index.run(index.Config(catalog=str(self.data / "id2name.txt"), output=str(self.index),
                                                       base_model=args.base_model, **self.grounding())),
                        after=("prepare",))

    def baselines(self) -> dict:
        """Few-shot SASRec (the same sampled rows), popularity and the last history title on the
        scoring rows: {name: {"ranks": [...], NDCG@10, HR@10 with intervals}}; each model is
        trained again when its settings or the data change. Written to ``baselines.json``."""
        import shutil

        from bigrec.data.catalog import read_catalog, row_target
        from bigrec.evaluation.metrics import target_id_lists, target_ranks
        from bigrec.evaluation.scores import load_scores
        from bigrec.stages import baseline

        rows = io.read_json(self.rows_path)
        catalog = read_catalog(self.data / "id2name.txt")
        targets = target_id_lists([row_target(r, catalog, "valid") for r in rows], catalog.titles)
        out = {}
        for name, model, sample in (("Popularity", "popularity", -1),
                                    (f"SASRec (same {self.args.sample} rows)", "sasrec", self.args.sample)):
            folder = self.root / f"{model}{'' if sample < 0 else f'_sample{sample}'}"
            config = baseline.Config(data=str(self.data), output_dir=str(folder), model=model, seed=self.args.seed,
                                     sample=sample, epochs=self.args.sasrec_epochs)

            def train_baseline(folder=folder, config=config) -> None:
                shutil.rmtree(folder, ignore_errors=True)
                baseline.run(config)

            settings = {"seed": config.seed, "sample": sample} | ({"epochs": config.epochs} if model == "sasrec" else {})
            self.stages.run(folder.name, settings,
                            [folder / "scores" / "valid_5000.safetensors"], train_baseline, after=("prepare",))
            scores = load_scores(folder / "scores" / "valid_5000.safetensors").align(rows)
            out[name] = summarise(target_ranks(scores, targets, higher_is_better=True))
        content = next(iter(self.points_dir_any().glob("*/metrics.details.json")), None)
        if content is None:
            return out  # the last-title line comes with the first scored point
        info = next(iter(io.read_json(content)["files"].values()))
        key = find_run(info, ranking="last_title")
        out["Last history title (content)"] = summarise(details_ranks(info, key))
        io.write_json(self.root / "baselines.json", out)
        return out

    def points_dir_any(self) -> Path:
        """A recipe's points folder with a scored point (any recipe: they score the same rows)."""
        for folder in sorted(self.root.glob("*/points")):
            if any(folder.glob("*/metrics.details.json")):
                return folder
        return self.root / "none"


def summarise(ranks) -> dict:
    from bigrec.evaluation.intervals import bootstrap_ci
    from bigrec.evaluation.metrics import ndcg_hr

    metrics, ci = ndcg_hr(ranks, TOPK), bootstrap_ci(ranks, TOPK)
    return {"ndcg10": metrics["NDCG"][K10], "ndcg10_ci": ci["NDCG"][K10], "hr10": metrics["HR"][K10],
            "hr10_ci": ci["HR"][K10], "rows": int(ranks.numel())}


def response_loss(base_model: str, adapter: Path, rows: list[dict], cutoff_len: int, batch: int = 16) -> float:
    """Mean cross-entropy per response token (title + EOS) of ``rows``, whatever the training loss
    covered; computed in bf16 (a fifth of fp32's time here), the same way at every point."""
    import torch

    from bigrec.llm.labelled_logits import LabelledLogits
    from bigrec.llm.models import load_model
    from bigrec.llm.sft_data import IGNORE_INDEX, Collator, SFTDataset

    model, tokenizer = load_model(base_model, "bf16", lora_weights=str(adapter), device="cpu")
    data = SFTDataset(rows, tokenizer, cutoff_len, train_on_inputs=False, name="scoring rows")
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))  # less padding
    collate = Collator(tokenizer.pad_token_id)
    labelled = LabelledLogits(model)
    total, tokens = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch):
                inputs = collate([data[i] for i in order[start:start + batch]])
                with labelled.positions(inputs["labels"]):
                    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                n = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
                total += float(labelled.loss(out, inputs["labels"])) * n
                tokens += n
    finally:
        labelled.remove()
    return total / max(tokens, 1)


class Recipe:
    """One recipe's training run, its points and its end."""

    def __init__(self, curve: Curve, name: str, settings: dict):
        self.curve, self.name, self.settings = curve, name, settings
        self.dir = curve.root / name
        self.train_dir = self.dir / "train"
        self.points_dir = self.dir / "points"
        self.end_path = self.dir / "end.json"

    def train_config(self, stop_after: int | None):
        from bigrec.stages import train

        args, s = self.curve.args, self.settings
        return train.Config(
            base_model=args.base_model, train_data_path=[str(self.curve.data / "train.json")],
            val_data_path=[str(self.curve.data / "valid.json")], val_sample=s["val_rows"],
            output_dir=str(self.train_dir), sample=args.sample, seed=args.seed, batch_size=s["batch_size"],
            micro_batch_size=s["micro_batch_size"], num_epochs=s["num_epochs"], learning_rate=s["learning_rate"],
            warmup_steps=s["warmup_steps"], train_on_inputs=s["train_on_inputs"],
            group_by_length=s["group_by_length"], early_stopping_patience=s["early_stopping_patience"],
            snapshot_epochs=[p for p in self.curve.args.points if p <= s["num_epochs"]], stop_after_epoch=stop_after,
            save_steps=args.save_steps, save_total_limit=1)

    def points(self) -> list[dict]:
        found = [io.read_json(p) for p in self.points_dir.glob("*.json")]
        return sorted(found, key=lambda p: (p["wall_s"], p["epoch"]))

    def ended(self) -> dict | None:
        return io.read_json(self.end_path) if self.end_path.is_file() else None

    def end(self, reason: str, **extra) -> None:
        io.write_json(self.end_path, {"reason": reason, **extra})
        log.info("[%s] ended: %s", self.name, reason)

    def run(self) -> None:
        from bigrec.stages import train

        wanted = [p for p in self.curve.args.points if p <= self.settings["num_epochs"]]
        for point in wanted:
            if self.ended():
                return
            self.score_snapshots()
            if self.stalled():
                return
            if (self.train_dir / "snapshots" / f"epoch-{point}").is_dir():
                continue
            log.info("[%s] training to epoch %d", self.name, point)
            summary = train.run(self.train_config(None if point == self.settings["num_epochs"] else point))
            if summary["early_stopped"]:
                self.score_snapshots()
                self.score(self.train_dir, "early-stop", {
                    "epoch": summary["epoch"], "best_step": summary["best_step"], "step": summary["global_step"],
                    "eval_loss": summary["best_eval_loss"], "wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"]},
                    summary["steps_per_epoch"])
                self.end("early stopping", epoch=summary["epoch"], best_step=summary["best_step"],
                         steps_per_epoch=summary["steps_per_epoch"])
                return
        self.score_snapshots()
        if not self.stalled() and not self.ended():
            self.end(f"last point (epoch {wanted[-1]})")

    def record(self) -> None:
        """What this run trains with: the recipe's settings, the training rows and the seeds."""
        args = self.curve.args
        io.write_json(self.dir / "recipe.json", {**self.settings, "sample": args.sample, "seed": args.seed,
                                                 "data_seed": args.data_seed})

    def train_only(self) -> None:
        """Train to the last point, keeping each point's snapshot; score nothing (the snapshots are
        scored elsewhere, e.g. on test rows by bench_quality --adapter)."""
        from bigrec.stages import train

        last = max(p for p in self.curve.args.points if p <= self.settings["num_epochs"])
        if not (self.train_dir / "snapshots" / f"epoch-{last}").is_dir():
            log.info("[%s] training to epoch %d (nothing scored)", self.name, last)
            train.run(self.train_config(None if last == self.settings["num_epochs"] else last))

    def stalled(self) -> bool:
        """Validation NDCG@10 has not improved over two doublings of the budget (epochs)."""
        scored = [p for p in self.points() if p["label"].startswith("epoch")]
        if len(scored) < 3:
            return False
        best = max(scored, key=lambda p: p["ndcg10"])
        last = max(p["epoch"] for p in scored)
        if last >= 4 * best["epoch"]:
            self.end(f"validation NDCG@10 not improved since epoch {best['epoch']} (two doublings, to epoch {last})")
            return True
        return False

    def score_snapshots(self) -> None:
        snaps = sorted((self.train_dir / "snapshots").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
        for snap in snaps:
            meta_path = snap / "snapshot.json"
            if meta_path.is_file():  # scored unless its point is up to date
                self.score(snap, snap.name, io.read_json(meta_path), None)

    def score(self, adapter: Path, label: str, meta: dict, steps_per_epoch: int | None) -> dict:
        """This snapshot's point, scored unless its record says it is up to date with these settings."""
        args, curve = self.curve.args, self.curve
        target = self.points_dir / f"{label}.json"
        settings = {"adapter": str(adapter), "step": meta.get("step"), "eval_loss": meta.get("eval_loss"),
                    "base_model": args.base_model, "num_beams": args.num_beams, **curve.grounding()}
        stage = f"point_{self.name}_{label}"
        redo = curve.stages.recorded(stage)  # scored before with other settings: its generations are stale
        curve.stages.run(stage, settings, [target], lambda: self._score(adapter, label, meta, steps_per_epoch, redo),
                         after=("rows", "index"))
        return io.read_json(target)

    def _score(self, adapter: Path, label: str, meta: dict, steps_per_epoch: int | None, redo: bool) -> None:
        from bigrec.stages import evaluate, generate

        args, curve = self.curve.args, self.curve
        target = self.points_dir / f"{label}.json"
        work = self.points_dir / label
        if redo:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        started = time.perf_counter()
        rows = io.read_json(curve.rows_path)
        loss = response_loss(args.base_model, adapter, rows, 512)
        result = work / "valid.json"
        if not result.is_file():
            generate.run(generate.Config(test_data_path=str(curve.rows_path), result_json_data=str(result),
                                         base_model=args.base_model, lora_weights=str(adapter),
                                         num_beams=args.num_beams, discard_stale_progress=True))
        metrics = work / "metrics.json"
        evaluate.run(evaluate.Config(catalog=str(curve.data / "id2name.txt"), input_dir=str(result),
                                     output=str(metrics), base_model=args.base_model, index_path=str(curve.index),
                                     last_title=True, **curve.grounding()))

        info = next(iter(io.read_json(metrics.with_name("metrics.details.json"))["files"].values()))
        diag = info["diagnostics"]
        point = {"recipe": self.name, "label": label, **meta,
                 "response_loss": loss, **summarise(details_ranks(info, "valid.json")),
                 "distinct_top1": diag["distinct_top1_share"], "exact_title_top1": diag["exact_title_top1_share"],
                 "history_copy_top1": diag["history_copy_top1_share"],
                 "most_frequent_top1": diag["most_frequent_top1"][:3],
                 "scoring_s": round(time.perf_counter() - started, 1)}
        if steps_per_epoch and meta.get("best_step"):
            point["best_epoch"] = meta["best_step"] / steps_per_epoch
        io.write_json(target, point)
        log.info("[%s] %s: NDCG@10 %.4f, response loss %.4f, %.1f wall-min", self.name, label, point["ndcg10"],
                 loss, meta["wall_s"] / 60)


def table(recipes: list[Recipe], baselines: dict) -> str:
    lines = ["| recipe | point | epoch | step | wall-min | CPU-min | ES val loss | response loss | NDCG@10 | HR@10 "
             "| distinct | exact | copies |", "|" + "---|" * 13]
    for recipe in recipes:
        for p in recipe.points():
            label = p["label"] + (f" (best epoch {p['best_epoch']:g})" if "best_epoch" in p else "")
            es = "" if p.get("eval_loss") is None else f"{p['eval_loss']:.4f}"
            copies = "" if p.get("history_copy_top1") is None else f"{p['history_copy_top1']:.1%}"
            lines.append(f"| {recipe.name} | {label} | {p['epoch']:g} | {p['step']} | {p['wall_s'] / 60:.1f} | "
                         f"{p['cpu_s'] / 60:.1f} | {es} | {p['response_loss']:.4f} | "
                         f"{with_interval(p['ndcg10'], p['ndcg10_ci'])} | {with_interval(p['hr10'], p['hr10_ci'])} | "
                         f"{p['distinct_top1']:.1%} | {p['exact_title_top1']:.1%} | {copies} |")
        end = recipe.ended()
        if end:
            lines.append(f"| {recipe.name} | ended: {end['reason']} |" + " |" * 11)
    for name, b in baselines.items():
        lines.append(f"| {name} | | | | | | | | {with_interval(b['ndcg10'], b['ndcg10_ci'])} | "
                     f"{with_interval(b['hr10'], b['hr10_ci'])} | | | |")
    return "\n".join(lines)


def plot(recipes: list[Recipe], baselines: dict, path: Path, rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for recipe in recipes:
        pts = [p for p in recipe.points() if p["label"].startswith("epoch")]
        if pts:
            x = [p["wall_s"] / 60 for p in pts]
            line, = ax.plot(x, [p["ndcg10"] for p in pts], marker="o", label=recipe.name)
            ax.fill_between(x, [p["ndcg10_ci"][0] for p in pts], [p["ndcg10_ci"][1] for p in pts],
                            color=line.get_color(), alpha=0.15)
            for p in pts:
                ax.annotate(f"{p['epoch']:g}", (p["wall_s"] / 60, p["ndcg10"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        stop = [p for p in recipe.points() if p["label"] == "early-stop"]
        if stop:
            ax.plot([stop[0]["wall_s"] / 60], [stop[0]["ndcg10"]], marker="*", markersize=12, color="black")
    styles = iter(["--", ":", "-."])
    for name, b in baselines.items():
        ax.axhline(b["ndcg10"], linestyle=next(styles, "--"), color="grey", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training + validation wall-minutes (2-core CPU); labels: epochs; star: early stopping's end")
    ax.set_ylabel(f"validation NDCG@10 ({rows} rows; band: 95% interval)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, off the lines
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="demo-long",
                        help=f"comma-separated demo configs: {', '.join(KNOWN)}, another shipped one or a YAML path")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--source", default=None)
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--sample", type=int, default=1024, help="training rows drawn with --seed")
    parser.add_argument("--seed", type=int, default=42, help="seed of the training rows' draw, training and SASRec")
    parser.add_argument("--data_seed", type=int, default=42,
                        help="seed of prepare's samples: the validation rows, the same for every --seed")
    parser.add_argument("--valid_rows", type=int, default=1000, help="validation rows every point is scored on")
    parser.add_argument("--points", default=",".join(map(str, POINTS)), help="epochs to score after")
    parser.add_argument("--num_beams", type=int, default=NUM_BEAMS)
    parser.add_argument("--sasrec_epochs", type=int, default=200)
    parser.add_argument("--save_steps", type=int, default=16, help="checkpoint every N optimizer steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting for every recipe (e.g. num_epochs=8)")
    parser.add_argument("--run_dir", default="runs/curve/{dataset}-seed{seed}")
    parser.add_argument("--report_only", action="store_true", help="print the table and draw what exists")
    parser.add_argument("--train_only", action="store_true",
                        help="train to the last --points epoch and stop: no scoring, no baselines")
    parser.add_argument("--score_only", action="store_true",
                        help="score the snapshots that exist, train nothing (the training can go on later)")
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir.format(dataset=args.dataset, seed=args.seed)
    args.points = sorted({int(p) for p in args.points.split(",") if p})
    names = [r for r in args.recipes.split(",") if r]
    overrides = dict(item.partition("=")[::2] for item in args.set)
    settings = {}
    for name in names:
        try:
            settings[name] = recipe(name, args.sample, overrides)
        except ConfigError as error:
            parser.error(f"recipe {name}: {error}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    curve = Curve(args)
    recipes = [Recipe(curve, name, settings[name]) for name in names]
    if args.train_only:
        curve.prepare()
        for run in recipes:
            run.record()
            run.train_only()
        return 0
    if args.score_only:
        curve.prepare()
        for run in recipes:
            run.score_snapshots()
    elif not args.report_only:
        curve.prepare()
        for run in recipes:
            run.record()
            run.run()
    if args.report_only:
        baselines = io.read_json(curve.root / "baselines.json") if (curve.root / "baselines.json").is_file() else {}
    else:
        baselines = curve.baselines()
    print(f"\n{args.dataset}, seed {args.seed}, {args.sample} training rows; every point scored on the same "
          f"{args.valid_rows} validation rows (free decoding, {args.num_beams} beams, the demo's grounding)\n")
    print(table(recipes, baselines))
    plot(recipes, baselines, curve.root / "curve.png", args.valid_rows)
    io.write_json(curve.root / "curve.json", {"recipes": {r.name: {"settings": r.settings, "points": r.points(),
                                                                   "end": r.ended()} for r in recipes},
                                             "baselines": {k: {kk: vv for kk, vv in v.items()}
                                                           for k, v in baselines.items()}})
    print(f"\nplot: {curve.root / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
