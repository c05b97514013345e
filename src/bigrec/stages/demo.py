"""``bigrec demo``: the whole pipeline on the bundled default, with a side-by-side report.

prepare ml-100k -> LoRA-tune SmolLM2-135M on 1,024 sampled examples -> for test (and
validation) rows, free beam search (the paper's) and likelihood ranking of every title, or
catalogue-constrained beam search (``--decoding``) ->
index the catalogue -> SASRec (on all training rows and on the same sampled rows BIGRec is
tuned on: the paper's few-shot comparison) and popularity -> evaluate BIGRec, and BIGRec +
popularity and BIGRec + CI for the beam decodings, the baselines and a content baseline (the last
history title, grounded the same way) on the same rows, with 95% bootstrap intervals and paired
differences, under the reference protocol and with each user's seen items left out ->
report.md, metrics (``metrics/comparison.json`` holds both protocols), plot, and ``run.yaml`` with
the ranking that won on validation for recommend and serve. Each decoding has its own stages
(``generate_test_free``, ``evaluate_likelihood``, ...) and its own folders (``results/<decoding>/``,
``metrics/bigrec_<decoding>.json``).

Every stage records the settings it ran with (``stages/<name>.json``); a rerun skips a stage
whose settings and upstream stages are unchanged and whose outputs exist, so a finished demo
reruns in seconds and a changed setting reruns only what it affects. Training and generation
are themselves resumable, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bigrec import io
from bigrec.config import ConfigError, option, stage_settings, to_dict
from bigrec.grounding.options import layer_option, pooling_option, title_text_option
from bigrec.llm.defaults import (
    CONSTRAINED_BEAMS,
    DEMO_SEARCH_NODES,
    GENERATE_BATCH_SIZE,
    MAX_NEW_TOKENS,
    NUM_BEAMS,
    PRECISION,
    PRIOR_WEIGHT,
)
from bigrec.llm.models import DEFAULT_MODEL
from bigrec.runner import StageRunner

log = logging.getLogger(__name__)


@dataclass
class Config:
    run_dir: str = option("runs/demo", "folder for every artifact of the run (reused by a rerun)")
    dataset: str = option("ml-100k", "dataset for `bigrec prepare` (ml-100k and ml-1m work offline)")
    source: str | None = option(None, "local copy of the dataset (see `bigrec prepare --source`)")
    base_model: str = option(DEFAULT_MODEL, "base model: folder, hub id or the bundled 'smollm2-135m'")
    sample: int = option(1024, "training examples drawn from train.json (the paper's few-shot setting); with "
                               "--layout timeline, users; -1 = all")
    layout: str = option("window", "the training text's layout: window (one prompt per example, the paper's) or "
                                   "timeline (each user's history as one text, loss on every target)",
                         choices=["window", "timeline"], keyed_at_default=False)
    lora: bool = option(True, "tune a LoRA adapter; false = every weight (full fine-tuning)", keyed_at_default=False)
    select_epoch: bool = option(False, "keep a snapshot after every epoch, rank the validation rows by likelihood "
                                       "with each, and use the epoch with the best validation NDCG@10",
                                keyed_at_default=False)
    save_steps: int = option(10, "training: a resumable checkpoint every N optimizer steps", minimum=1,
                             changes_output=False)
    prompt_titles: str = option("catalogue", "titles in prompts and answers: as the catalogue writes them (the "
                                             "reference) or natural ('The Shining (1980)')",
                                choices=["catalogue", "natural"])
    num_epochs: int = option(1, "training epochs (64 steps each at batch 16; early stopping may end sooner)")
    batch_size: int = option(16, "examples per optimizer step (the reference's 128 gives 8 steps on 1,024)")
    micro_batch_size: int = option(8, "examples per forward pass")
    learning_rate: float = option(5e-4, "peak learning rate (LoRA on a 135M model learns slowly at 1e-4)")
    train_on_inputs: bool = option(False, "loss on the prompt too; false teaches titles, not copying the history")
    warmup_steps: int | None = option(None, "linear warm-up steps (default: a quarter of an epoch, at most 20)",
                                      minimum=0, keyed_at_default=False)
    group_by_length: bool = option(False, "batch training examples of similar length together (the paper's)",
                                   keyed_at_default=False)
    early_stopping_patience: int = option(5, "validation evaluations (one per epoch) without a lower loss before "
                                             "training stops; 0 = never", minimum=0, keyed_at_default=False)
    val_rows: int = option(128, "validation rows for the early-stopping loss")
    test_rows: int = option(500, "test rows to generate for and evaluate on (fewer than 500 is noise)", minimum=1)
    valid_rows: int = option(200, "validation rows generated for choosing the re-weighting gamma", minimum=1)
    num_beams: int = option(NUM_BEAMS, "beams per row (free decoding)", minimum=1)
    decoding: str = option("free,likelihood", "comma-separated, side by side: free (beam search + L2 grounding, the "
                                              "paper's), constrained (beam search over catalogue titles), likelihood "
                                              "(every title ranked by its log-probability); both = free,constrained; "
                                              "all = the three")
    prior_weight: float = option(PRIOR_WEIGHT, "likelihood: subtract this times log p(title | an empty history)",
                                 keyed_at_default=False)
    exclude_history: bool = option(True, "likelihood: leave each row's history titles out of its ranking (better on "
                                         "ml-100k's validation rows; generate's, run.yaml's and the service's option of "
                                         "the same name); both evaluation protocols are reported either way",
                                   keyed_at_default=False)
    likelihood_gate: bool = option(True, "beside another decoding: rank the test rows by likelihood only where it beats "
                                         "popularity on the validation rows (ranked first); elsewhere it is left out "
                                         "and the report says why", keyed_at_default=False)
    search_nodes: int = option(DEMO_SEARCH_NODES, "likelihood: the most title tokens a row's search feeds the model (the few-shot "
                                    "adapter's flat distribution would need thousands to certify its top 10; "
                                    "fewer is faster)", minimum=1)
    constrained_beams: int = option(CONSTRAINED_BEAMS, "beams per row (constrained decoding; each beam is one catalogue title)", minimum=1)
    max_new_tokens: int = option(MAX_NEW_TOKENS, "upper bound on generated tokens (beams stop at the title's end)")
    gen_batch_size: int = option(GENERATE_BATCH_SIZE, "rows per generate call", minimum=1)
    precision: str = option(PRECISION, "auto (bf16 where the CPU or GPU has it), fp32, bf16, fp16",
                            choices=["auto", "fp32", "bf16", "fp16"])
    # Grounding: chosen on the validation generations of a demo run (benchmarks/bench_grounding.py);
    # the report also shows the reference's (last layer, last token, bare titles) on the same generations.
    pooling: str = pooling_option("mean")
    embed_layer: int = layer_option()
    title_text: str = title_text_option("natural")
    ground_beams: int = option(1, "free decoding: rank items by the nearest of the first N beams (1 = the paper's "
                                  "top generation only)", minimum=1)
    sasrec_epochs: int = option(40, "SASRec: maximum epochs (early stopping on validation NDCG@10)")
    seed: int = option(42, "seed for sampling and training")
    data_seed: int | None = option(None, "seed of prepare's samples (which test and validation rows); "
                                         "default --seed. Set it to compare seeds on the same rows",
                                   keyed_at_default=False)
    users: int | None = option(None, "prepare: a random subset of this many users (drawn with the data seed); every "
                                     "method, baseline and split sees exactly them (a large catalogue's users on a "
                                     "CPU budget)", minimum=1, keyed_at_default=False)
    adapter: str | None = option(None, "a LoRA adapter trained elsewhere (a `bigrec train` output or one of its "
                                       "snapshots): copied into the run and used instead of tuning; give the "
                                       "--sample and --seed it was trained with, so few-shot SASRec sees its rows",
                                 keyed_at_default=False)

    def validate(self) -> None:
        from bigrec.llm.decoders import DECODINGS

        unknown = [d for d in decodings_of(self) if d not in DECODINGS]
        if unknown or not decodings_of(self):
            raise ConfigError(f"--decoding {self.decoding!r}: expected a comma-separated list of "
                              f"{', '.join(DECODINGS)}, or both, or all")
        if self.prior_weight < 0:
            raise ConfigError(f"--prior_weight must be at least 0, got {self.prior_weight}")
        if self.prior_weight and "likelihood" not in decodings_of(self):
            raise ConfigError("--prior_weight applies to --decoding likelihood (or all)")
        if self.select_epoch and "likelihood" not in decodings_of(self):
            raise ConfigError("--select_epoch ranks validation rows by likelihood: add likelihood to --decoding")
        if self.adapter is not None and (not self.lora or self.select_epoch):
            raise ConfigError("--adapter is a LoRA adapter trained elsewhere: it takes neither --lora false nor "
                              "--select_epoch")

    def likelihood_options(self, decoding: str) -> dict:
        """The prior and the history exclusion a decoding ranks with: generation and run.yaml alike."""
        likelihood = decoding == "likelihood"
        return {"prior_weight": self.prior_weight if likelihood else 0.0,
                "exclude_history": likelihood and self.exclude_history}


FEW_SHOT = "sasrec_fewshot"  # the SASRec trained on the rows BIGRec is tuned on
GATE = "likelihood_gate.json"  # whether validation kept likelihood ranking for the test rows (likelihood_gate)
PROTOCOLS = {"reference": "", "unseen": "_unseen"}  # ranking protocol -> metrics file suffix
CONTENT = "Last history title (content)"
LIKELIHOOD_CF = "BIGRec (likelihood) + SASRec"  # likelihood + SASRec (bigrec.grounding.likelihood_cf)


def side_by_side(run_dir: Path, test_rows: list[dict], metrics_paths: dict[str, Path], sample: int,
                 reference_path: Path | None, fewshot_paths: dict[str, Path] | None = None,
                 few_shot: str | None = None) -> dict:
    """Every method's per-row ranks on the demo's test rows under one protocol (the evaluate
    outputs say which): metrics, intervals, the paired differences the paper's claims rest on,
    and the evaluation details per decoding (``infos``). ``fewshot_paths``: per decoding, the
    evaluation re-weighted by the few-shot SASRec's scores; ``few_shot``: the few-shot SASRec's
    label (default: it trained on the same ``sample`` rows as BIGRec)."""
    import torch

    from bigrec.data.catalog import read_catalog
    from bigrec.evaluation.comparison import Comparison
    from bigrec.evaluation.metrics import TOPK, details_ranks, target_ranks
    from bigrec.evaluation.results import history_mask, row_targets
    from bigrec.evaluation.runs import find_run
    from bigrec.evaluation.scores import load_scores

    catalog = read_catalog(run_dir / "data" / "id2name.txt")
    targets = row_targets(test_rows, catalog, "test")
    row_ids = [r.get("row") for r in test_rows]
    cmp = Comparison(len(test_rows))
    infos: dict[str, dict] = {}
    exclude = None
    few_shot = few_shot or f"SASRec (same {sample} examples)"
    for decoding, metrics_path in metrics_paths.items():
        details = io.read_json(metrics_path.with_name(metrics_path.stem + ".details.json"))
        if details.get("exclude_history"):
            exclude = history_mask([r["history_item_id"] for r in test_rows], targets, catalog)
        test_name = next(iter(details["files"]))  # the result file's name, "test.json"
        info = infos[decoding] = details["files"][test_name]
        if info["rows"] != row_ids:
            raise ValueError(f"{metrics_path}: evaluated rows differ from {run_dir / 'inputs' / 'test.json'} "
                             "(targets missing from the catalogue?)")
        label = f"BIGRec ({decoding})"
        shown = ((f"{label}", {"ranking": "plain"}),
                 (f"{label} + popularity", {"ranking": "reweighted", "weights": "popularity", "k": 10}),
                 (f"{label} + CI (SASRec)", {"ranking": "reweighted", "weights": "CI", "k": 10}),
                 (f"{label} + CI blend (SASRec)", {"ranking": "blend", "weights": "CI"}),
                 (f"{label} + SASRec", {"ranking": "likelihood_cf"}))
        for name, fields in shown:
            if key := find_run(info, **fields):
                cmp.add(name, details_ranks(info, key))
        if fewshot_paths and decoding in fewshot_paths:
            few = io.read_json(fewshot_paths[decoding].with_name(fewshot_paths[decoding].stem + ".details.json"))
            few_info = few["files"][test_name]
            for name, fields in ((f"{label} + CI (SASRec, same {sample} examples)",
                                  {"ranking": "reweighted", "weights": "CI", "k": 10}),
                                 (f"{label} + CI blend (SASRec, same {sample} examples)",
                                  {"ranking": "blend", "weights": "CI"})):
                if key := find_run(few_info, **fields):
                    cmp.add(name, details_ranks(few_info, key))
        if decoding == "free" and reference_path is not None:
            ref = io.read_json(reference_path.with_name(reference_path.stem + ".details.json"))
            ref_info = ref["files"][test_name]
            cmp.add("BIGRec (free), reference grounding", details_ranks(ref_info, find_run(ref_info, ranking="plain")))
    content = next((details_ranks(info, key) for info in infos.values()
                    if (key := find_run(info, ranking="last_title"))), None)
    for model, label in (("sasrec", "SASRec"), (FEW_SHOT, few_shot), ("popularity", "Popularity")):
        scores = load_scores(run_dir / model / "scores" / "test_5000.safetensors").align(test_rows)
        cmp.add(label, target_ranks(scores, targets, higher_is_better=True, exclude=exclude))
    if content is not None:
        cmp.add(CONTENT, content)
    unranked = torch.zeros(len(test_rows)) if exclude is None else exclude.sum(1).float()  # [R]
    cmp.expected["Random"] = random_ndcg_hr(len(catalog) - unranked, TOPK)
    lead = next(name for name in (f"BIGRec ({d})" for d in ("free", "constrained", *metrics_paths)) if name in cmp.ranks)
    pairs = [(lead, few_shot), (lead, CONTENT), (lead, "Popularity"), (lead, "SASRec"),
             (f"{lead} + CI (SASRec)", "SASRec"), (f"{lead} + CI blend (SASRec)", "SASRec"),
             (f"{lead} + CI (SASRec)", few_shot), (f"{lead} + CI (SASRec, same {sample} examples)", few_shot),
             (f"{lead} + CI blend (SASRec, same {sample} examples)", few_shot),
             (LIKELIHOOD_CF, "SASRec"), (LIKELIHOOD_CF, "BIGRec (likelihood)")]
    return {"metrics": cmp.metrics(), "intervals": cmp.intervals(), "paired": cmp.paired(pairs), "infos": infos}


def default_ranking(infos: dict[str, dict]) -> tuple[str, bool, float | None, str | None]:
    """What recommend/serve rank by: plain BIGRec, BIGRec + CI by the paper's formula or by the
    blend (on free decoding, which they run; the constrained run's figures where there is none), or
    likelihood ranking, plain or with SASRec (:mod:`bigrec.grounding.likelihood_cf`; use CI then means
    that blend), whichever has the best validation NDCG@10 (the validation rows chose gamma and the
    weights too; the test rows never enter). Returns (decoding, use CI, blend weight or None, why)."""
    from bigrec.evaluation.metrics import TOPK

    j = TOPK.index(10)
    found: dict[str, tuple[float, str, bool, float | None]] = {}
    info = infos.get("free") or infos.get("constrained") or {}
    if "CI" in info and "valid_plain" in info:
        found["plain BIGRec"] = (info["valid_plain"]["NDCG"][j], "free", False, None)
        found["BIGRec + CI (the paper's formula)"] = (info["CI"]["valid_single"]["NDCG"][j], "free", True, None)
        if "blend" in info["CI"]:
            weight = info["CI"]["blend"]["weight"]
            found[f"BIGRec + CI (blend, weight {weight})"] = (info["CI"]["blend"]["valid_ndcg10"], "free", True, weight)
    if "valid_plain" in infos.get("likelihood", {}):
        found["likelihood ranking"] = (infos["likelihood"]["valid_plain"]["NDCG"][j], "likelihood", False, None)
    if "likelihood_cf" in infos.get("likelihood", {}):
        cf = infos["likelihood"]["likelihood_cf"]
        content = f", last title {cf['content_weight']}" if cf.get("content_weight") else ""
        found[f"likelihood + SASRec (weight {cf['weight']}{content})"] = (cf["valid_ndcg10"], "likelihood", True, None)
    if not found:
        return "free", False, None, None
    best = max(found, key=lambda name: found[name][0])
    why = ", ".join(f"{name} {value:.4f}" for name, (value, *_) in found.items())
    value, decoding, use_ci, weight = found[best]
    if len(found) == 1:  # nothing to choose between: say so rather than "chosen"
        return decoding, use_ci, weight, f"{best}, the only ranking this run made (validation NDCG@10 {value:.4f})"
    return decoding, use_ci, weight, f"{best} chosen on validation NDCG@10 ({why})"


def first_rows(src: Path, dst: Path, n: int) -> None:
    """The first ``n`` rows of an instruction file (the seeded 5,000-row sample keeps its order)."""
    rows = io.read_json(src)
    io.write_json_rows(dst, rows[:n])


def random_ndcg_hr(num_items, topk: tuple[int, ...]) -> dict[str, list[float]]:
    """Expected metrics of a uniformly random ranking with one relevant item among ``num_items``
    (an int, or a tensor of per-row counts whose expectations are averaged)."""
    import torch

    counts = torch.as_tensor(num_items, dtype=torch.float64).reshape(-1)
    gains = torch.tensor([1 / math.log2(r + 2) for r in range(max(topk))], dtype=torch.float64).cumsum(0)
    ndcg, hr = [], []
    for k in topk:
        upto = torch.clamp(counts, max=k).long()  # ranks that can fall within the first k
        ndcg.append(float((gains[upto - 1] / counts).mean()))
        hr.append(float((upto / counts).mean()))
    return {"NDCG": ndcg, "HR": hr}


class Paths:
    """Where the demo's stages read and write, inside ``run_dir``."""

    def __init__(self, run: Path):
        self.run = run
        self.data, self.adapter, self.results = run / "data", run / "adapter", run / "results"
        self.model = run / "model"  # a fully tuned model (--lora false)
        self.index = run / "index.safetensors"

    def tuned(self, cfg: Config) -> Path:
        """The training's output folder: the adapter, or the fully tuned model."""
        return self.adapter if cfg.lora else self.model

    def inputs(self, split: str) -> Path:
        return self.run / "inputs" / f"{split}.json"

    def scores(self, model: str, split: str) -> Path:
        return self.run / model / "scores" / f"{split}_5000.safetensors"


def warmup_steps(cfg: Config) -> int:
    """The warm-up the demo trains with: ``--warmup_steps``, else a quarter of an epoch, at most 20."""
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(20, max(1, cfg.sample // cfg.batch_size // 4))


def decodings_of(cfg: Config) -> list[str]:
    """The decodings ``--decoding`` names, in its order, each once."""
    named = {"both": ["free", "constrained"], "all": ["free", "constrained", "likelihood"]}
    return list(dict.fromkeys(d for part in cfg.decoding.split(",") if part.strip()
                              for d in named.get(part.strip(), [part.strip()])))


def gated(cfg: Config) -> bool:
    """Whether validation decides if likelihood ranking reaches the test rows: beside another
    decoding (with ``--select_epoch``, or alone, it is the recipe itself and always runs)."""
    decodings = decodings_of(cfg)
    return cfg.likelihood_gate and "likelihood" in decodings and len(decodings) > 1 and not cfg.select_epoch


def ranked_decodings(cfg: Config, paths: Paths) -> list[str]:
    """The decodings whose test rows are ranked: ``--decoding``'s, less likelihood where the
    validation rows left it out (:func:`likelihood_gate`)."""
    decodings = decodings_of(cfg)
    record = paths.run / GATE
    if gated(cfg) and record.is_file() and not io.read_json(record)["kept"]:
        decodings.remove("likelihood")
    return decodings


def likelihood_gate(cfg: Config, paths: Paths) -> None:
    """Keep likelihood ranking for the test rows only where it beats popularity's NDCG@10 on the
    validation rows, history titles left out of both as the ranking leaves them.

    A flat few-shot adapter's search is budget-bound: on Amazon's long titles the demo's budget
    certified no row's top 10 and the ranking scored below popularity (docs/results/amazon-industrial.md),
    while on ml-100k it beat free decoding. Validation tells the two apart before the test rows' cost."""
    from bigrec.data.catalog import read_catalog
    from bigrec.evaluation.metrics import ndcg_hr, target_ranks
    from bigrec.evaluation.results import certified_share, history_mask, read_results, row_targets
    from bigrec.evaluation.scores import load_scores

    catalog = read_catalog(paths.data / "id2name.txt")
    rows = io.read_json(paths.inputs("valid"))
    targets = row_targets(rows, catalog, "valid")
    exclude = history_mask([r["history_item_id"] for r in rows], targets, catalog) if cfg.exclude_history else None
    popularity = load_scores(paths.scores("popularity", "valid")).align(rows)
    pop_ndcg = ndcg_hr(target_ranks(popularity, targets, higher_is_better=True, exclude=exclude), (10,))["NDCG"][0]
    result = paths.results / "likelihood" / "valid.json"
    ndcg = candidates_ndcg(result, paths.data / "id2name.txt")
    record = {"kept": ndcg > pop_ndcg, "valid_ndcg10": ndcg, "popularity_valid_ndcg10": pop_ndcg,
              "valid_rows": len(rows), "search_nodes": cfg.search_nodes,
              "certified_top10_share": certified_share(read_results(result, catalog).rows)}
    io.write_json(paths.run / GATE, record)
    log.info("[likelihood_gate] likelihood ranking %s: validation NDCG@10 %.4f against popularity's %.4f "
             "(top 10 certified in %.1f%% of rows)", "kept" if record["kept"] else "left out", ndcg, pop_ndcg,
             100 * record["certified_top10_share"])


def gate_note(cfg: Config, paths: Paths) -> str | None:
    """The report's sentence for a likelihood ranking the validation rows left out, else None."""
    record = paths.run / GATE
    if not gated(cfg) or not record.is_file() or io.read_json(record)["kept"]:
        return None
    r = io.read_json(record)
    return (f"Likelihood ranking was left out of the test rows: on the {r['valid_rows']} validation rows its "
            f"NDCG@10 {r['valid_ndcg10']:.4f} did not beat popularity's {r['popularity_valid_ndcg10']:.4f} (its "
            f"top 10 certified in {r['certified_top10_share']:.1%} of rows at {r['search_nodes']} title tokens; "
            "--likelihood_gate false ranks them anyway).")


@dataclass(frozen=True)
class Tuned:
    """The tuned model generation and grounding use: a LoRA adapter on the base model, or a fully
    tuned model folder; with ``--select_epoch``, the snapshot of the epoch chosen on validation."""

    base_model: str  # what generation loads (the tuned folder itself after full fine-tuning)
    adapter: str | None  # the LoRA adapter folder; None after full fine-tuning
    epoch: int | None  # the chosen epoch, or None (the end of training)

    def generation(self) -> dict:
        return {"base_model": self.base_model, "lora_weights": self.adapter}


def prepare_config(cfg: Config, paths: Paths):
    """``bigrec prepare``'s config for the demo's data (the data seed draws the rows and any user subset)."""
    from bigrec.stages import prepare

    return prepare.Config(dataset=cfg.dataset, out=str(paths.data), source=cfg.source,
                          seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
                          prompt_titles=cfg.prompt_titles, layout=cfg.layout, users=cfg.users)


def train_config(cfg: Config, paths: Paths):
    """``bigrec train``'s config for the demo's tuning (also what ``bench_full_step`` times)."""
    from bigrec.stages import train

    return train.Config(
        base_model=cfg.base_model, train_data_path=[str(paths.data / "train.json")],
        val_data_path=[str(paths.data / "valid.json")], val_sample=cfg.val_rows, output_dir=str(paths.tuned(cfg)),
        sample=cfg.sample, seed=cfg.seed, batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
        num_epochs=cfg.num_epochs, learning_rate=cfg.learning_rate, train_on_inputs=cfg.train_on_inputs,
        precision=cfg.precision, group_by_length=cfg.group_by_length,
        early_stopping_patience=cfg.early_stopping_patience, warmup_steps=warmup_steps(cfg), layout=cfg.layout,
        lora=cfg.lora, save_steps=cfg.save_steps,
        snapshot_epochs=list(range(1, cfg.num_epochs + 1)) if cfg.select_epoch else [])


def generate_config(cfg: Config, paths: Paths, tuned: Tuned, decoding: str, split: str, result: Path):
    from bigrec.stages import generate

    return generate.Config(
        test_data_path=str(paths.inputs(split)), result_json_data=str(result), **tuned.generation(),
        batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens, precision=cfg.precision, decoding=decoding,
        num_beams=cfg.num_beams if decoding == "free" else cfg.constrained_beams, layout=cfg.layout,
        catalog=str(paths.data / "id2name.txt") if decoding != "free" else None, **cfg.likelihood_options(decoding),
        **({"search_nodes": cfg.search_nodes, "cf_scores": str(paths.scores("sasrec", split))}
           if decoding == "likelihood" else {}),  # likelihood: SASRec's top titles scored too
        discard_stale_progress=True)  # a stage reruns on new settings; rows of old ones are no use


def candidates_ndcg(path: Path, catalog_path: Path, k: int = 10) -> float:
    """NDCG@k of a likelihood result file from its ranked candidates alone (``predict_ids``): a
    target past them scores 0 at any k up to their number."""
    from bigrec.data.catalog import read_catalog
    from bigrec.evaluation.results import read_results

    results = read_results(path, read_catalog(catalog_path))
    gains = []
    for first, targets in zip(results.first, results.targets, strict=True):
        place = next((i for i, item in enumerate(first) if item in targets), None)
        gains.append(1 / math.log2(place + 2) if place is not None and place < k else 0.0)
    return sum(gains) / max(1, len(gains))


def choose_epoch(cfg: Config, stages: StageRunner, paths: Paths) -> int:
    """Rank the validation rows by likelihood with every epoch's snapshot; the epoch with the best
    NDCG@10 (the earliest on a tie) is the one the test rows are ranked with."""
    snapshots = paths.tuned(cfg) / "snapshots"
    ranked = []
    for epoch in range(1, cfg.num_epochs + 1):
        folder = snapshots / f"epoch-{epoch}"
        tuned = Tuned(cfg.base_model, str(folder), epoch) if cfg.lora else Tuned(str(folder), None, epoch)
        result = paths.results / "epochs" / f"epoch-{epoch}" / "valid.json"
        gen_cfg = generate_config(cfg, paths, tuned, "likelihood", "valid", result)
        stages.run(f"generate_valid_likelihood_epoch{epoch}", stage_settings(gen_cfg), [result],
                   lambda c=gen_cfg: generate_run(c), after=("inputs", "train", "sasrec"))
        ranked.append(f"generate_valid_likelihood_epoch{epoch}")

    def choose() -> None:
        ndcg = {epoch: candidates_ndcg(paths.results / "epochs" / f"epoch-{epoch}" / "valid.json",
                                       paths.data / "id2name.txt") for epoch in range(1, cfg.num_epochs + 1)}
        best = max(ndcg, key=lambda e: (ndcg[e], -e))
        io.write_json(paths.run / "epoch.json", {"epoch": best, "valid_ndcg10": ndcg, "valid_rows": cfg.valid_rows})
        log.info("epoch %d chosen on validation NDCG@10 (%s)", best,
                 ", ".join(f"epoch {e}: {v:.4f}" for e, v in ndcg.items()))

    stages.run("choose_epoch", {"epochs": cfg.num_epochs}, [paths.run / "epoch.json"], choose, after=tuple(ranked))
    return int(io.read_json(paths.run / "epoch.json")["epoch"])


def generate_run(gen_cfg) -> None:
    from bigrec.stages import generate

    generate.run(gen_cfg)


def tune_and_generate(cfg: Config, stages: StageRunner, paths: Paths) -> Tuned:
    """prepare -> the test and validation inputs -> tuning (LoRA or every weight; with
    ``--select_epoch``, the epoch chosen on validation) -> generation for each decoding and split."""
    from bigrec.stages import prepare, train

    data = paths.data
    prep_cfg = prepare_config(cfg, paths)
    stages.run("prepare", stage_settings(prep_cfg), [data / "test_5000.json", data / "id2name.txt"],
               lambda: prepare.run(prep_cfg))

    def make_inputs() -> None:
        first_rows(data / "test_5000.json", paths.inputs("test"), cfg.test_rows)
        first_rows(data / "valid_5000.json", paths.inputs("valid"), cfg.valid_rows)

    stages.run("inputs", {"test_rows": cfg.test_rows, "valid_rows": cfg.valid_rows},
               [paths.inputs("test"), paths.inputs("valid")], make_inputs, after=("prepare",))

    train_cfg = train_config(cfg, paths)
    tuned_dir = paths.tuned(cfg)

    def tune() -> None:
        # The folder's checkpoints resume only a run of these settings on these rows; train would
        # refuse another's, and the demo owns the folder, so it starts afresh instead.
        if tuned_dir.exists() and (other := train.other_run(train_cfg)):
            log.info("[train] %s holds another run's training (%s): starting afresh", tuned_dir, "; ".join(other))
            shutil.rmtree(tuned_dir)
        train.run(train_cfg)

    if cfg.adapter is None:
        done = tuned_dir / ("adapter_config.json" if cfg.lora else "config.json")
        stages.run("train", stage_settings(train_cfg), [done], tune, after=("prepare",))
    else:
        given = Path(cfg.adapter)
        weights = given / "adapter_model.safetensors"
        if not ((given / "adapter_config.json").is_file() and weights.is_file()):
            raise ConfigError(f"adapter: {given} holds no adapter_config.json and adapter_model.safetensors")
        # Keyed by the weights' content, so a retrained adapter at the same path reruns what follows.
        stages.run("train", {"adapter": str(given.resolve()), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
                   [paths.adapter / "adapter_config.json"], lambda: copy_adapter(given, paths.adapter),
                   after=("prepare",))

    baselines(cfg, stages, paths)  # likelihood ranking reads SASRec's scores
    after = ("inputs", "train")
    if cfg.select_epoch:
        epoch = choose_epoch(cfg, stages, paths)
        folder = str(tuned_dir / "snapshots" / f"epoch-{epoch}")
        tuned = Tuned(cfg.base_model, folder, epoch) if cfg.lora else Tuned(folder, None, epoch)
        after = ("inputs", "train", "choose_epoch")
    else:
        tuned = Tuned(cfg.base_model, str(tuned_dir), None) if cfg.lora else Tuned(str(tuned_dir), None, None)

    for decoding in decodings_of(cfg):
        gate = decoding == "likelihood" and gated(cfg)
        for split in ("valid", "test") if gate else ("test", "valid"):
            if gate and split == "test":  # the validation rows decide whether the test rows are ranked
                stages.run("likelihood_gate", {"valid_rows": cfg.valid_rows, "exclude_history": cfg.exclude_history},
                           [paths.run / GATE], lambda: likelihood_gate(cfg, paths),
                           after=("generate_valid_likelihood", "popularity"))
                if "likelihood" not in ranked_decodings(cfg, paths):
                    continue
            result = paths.results / decoding / f"{split}.json"
            gen_cfg = generate_config(cfg, paths, tuned, decoding, split, result)
            upstream = (*after, "sasrec") if decoding == "likelihood" else after
            if cfg.select_epoch and decoding == "likelihood" and split == "valid":
                # the chosen epoch has ranked these rows already, with these settings
                ranked = paths.results / "epochs" / f"epoch-{tuned.epoch}" / "valid.json"
                stages.run(f"generate_{split}_{decoding}", stage_settings(gen_cfg), [result],
                           lambda src=ranked, dst=result: io.write_json(dst, io.read_json(src)), after=upstream)
                continue
            stages.run(f"generate_{split}_{decoding}", stage_settings(gen_cfg), [result],
                       lambda c=gen_cfg: generate_run(c), after=upstream)
    return tuned


def copy_adapter(src: Path, dst: Path) -> None:
    """The adapter's files into the run (a half-copied folder is never taken for a finished one)."""
    staging = dst.with_name(dst.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging, ignore=shutil.ignore_patterns("checkpoint-*", "snapshots", "best"))
    shutil.rmtree(dst, ignore_errors=True)
    staging.rename(dst)


def fewshot_rows(cfg: Config) -> int:
    """The rows the few-shot SASRec trains on: BIGRec's sample, or the demo's 1,024 when BIGRec trains on all."""
    return cfg.sample if cfg.sample > 0 else 1024


def fewshot_label(cfg: Config) -> str:
    same = "same " if cfg.sample > 0 else ""
    return f"SASRec ({same}{fewshot_rows(cfg)} examples)"


def baselines(cfg: Config, stages: StageRunner, paths: Paths) -> None:
    """Popularity, SASRec on every training row and SASRec on BIGRec's sampled rows (or on 1,024 of
    them when BIGRec trains on all); they need the prepared data only, and run before generation,
    as likelihood ranking reads SASRec's scores."""
    from bigrec.stages import baseline

    for model, sample in (("popularity", -1), ("sasrec", -1), (FEW_SHOT, fewshot_rows(cfg))):
        b_cfg = baseline.Config(data=str(paths.data), output_dir=str(paths.run / model), model=model.split("_")[0],
                                seed=cfg.seed, epochs=cfg.sasrec_epochs, sample=sample)
        stages.run(model, stage_settings(b_cfg), [paths.scores(model, "test")],
                   lambda c=b_cfg: baseline.run(c), after=("prepare",))


def index_and_baselines(cfg: Config, stages: StageRunner, paths: Paths, tuned: Tuned) -> None:
    """The item index (the baselines ran before generation: :func:`baselines`). The index embeds
    titles with the model that serves: the base model under a LoRA adapter, the tuned model itself
    after full fine-tuning."""
    from bigrec.grounding.options import grounding_of, grounding_options
    from bigrec.stages import index as index_stage

    idx_cfg = index_stage.Config(catalog=str(paths.data / "id2name.txt"), output=str(paths.index),
                                 base_model=ground_model(cfg, tuned), precision=cfg.precision, overwrite=True,
                                 **grounding_options(grounding_of(cfg)))
    after = ("prepare",) if cfg.lora else ("prepare", "train", *(("choose_epoch",) if cfg.select_epoch else ()))
    stages.run("index", stage_settings(idx_cfg), [paths.index], lambda: index_stage.run(idx_cfg), after=after)


def ground_model(cfg: Config, tuned: Tuned) -> str:
    """The model whose embeddings ground titles: the base model, or the fully tuned one."""
    return cfg.base_model if cfg.lora else tuned.base_model


def evaluations(cfg: Config, stages: StageRunner, paths: Paths, tuned: Tuned) -> tuple[dict, dict, Path | None]:
    """Every evaluation: per decoding and protocol, BIGRec with popularity and CI (full SASRec) and
    with CI from the few-shot SASRec; the paper's grounding beside ours where they differ.

    Returns the metrics files: {protocol: {decoding: path}} for each kind, and the reference
    grounding's (None when not run)."""
    from bigrec.grounding.embedding import REFERENCE
    from bigrec.grounding.options import grounding_of, grounding_options
    from bigrec.stages import evaluate

    catalog = str(paths.data / "id2name.txt")
    metrics_paths: dict[str, dict[str, Path]] = {protocol: {} for protocol in PROTOCOLS}
    fewshot_paths: dict[str, dict[str, Path]] = {protocol: {} for protocol in PROTOCOLS}
    for decoding in ranked_decodings(cfg, paths):
        results = paths.results / decoding
        generated = (f"generate_test_{decoding}", f"generate_valid_{decoding}", "index")
        # A likelihood ranking puts its ranked candidates (the top 20) first, so re-weighting would order
        # only what lies below them and print copies of the plain rows: it is evaluated plain and as
        # likelihood + SASRec over both models' top titles (bigrec.grounding.likelihood_cf) instead.
        reweight = decoding != "likelihood"
        reweighting = dict(popularity=str(paths.data / "train.csv"), ci_scores=str(paths.scores("sasrec", "test")),
                           valid_ci_scores=str(paths.scores("sasrec", "valid"))) if reweight else dict(
            cf_scores=str(paths.scores("sasrec", "test")), valid_cf_scores=str(paths.scores("sasrec", "valid")))
        for protocol, suffix in PROTOCOLS.items():
            metrics_paths[protocol][decoding] = metrics_path = paths.run / "metrics" / f"bigrec_{decoding}{suffix}.json"
            eval_cfg = evaluate.Config(
                catalog=catalog, input_dir=str(results / "test.json"), output=str(metrics_path),
                base_model=ground_model(cfg, tuned), valid_input_dir=str(results / "valid.json"), **reweighting,
                index_path=str(paths.index), precision=cfg.precision, last_title=True, ground_beams=cfg.ground_beams,
                exclude_history=protocol == "unseen", **grounding_options(grounding_of(cfg)))
            stages.run(f"evaluate_{decoding}{suffix}", stage_settings(eval_cfg), [metrics_path],
                       lambda c=eval_cfg: evaluate.run(c), after=(*generated, "popularity", "sasrec"))
            if not reweight:
                continue
            # CI from the SASRec trained on BIGRec's own sampled rows: claim 2 on the same few samples
            few_path = fewshot_paths[protocol][decoding] = metrics_path.with_name(
                f"bigrec_{decoding}_fewshot_ci{suffix}.json")
            few_cfg = dataclasses.replace(
                eval_cfg, output=str(few_path), popularity=None, last_title=False,
                ci_scores=str(paths.scores(FEW_SHOT, "test")), valid_ci_scores=str(paths.scores(FEW_SHOT, "valid")))
            stages.run(f"evaluate_{decoding}_fewshot_ci{suffix}", stage_settings(few_cfg), [few_path],
                       lambda c=few_cfg: evaluate.run(c), after=(*generated, FEW_SHOT))
    # The paper's grounding beside ours, on the same generations: what the choice of embedding is worth.
    if grounding_of(cfg) == REFERENCE or "free" not in decodings_of(cfg):
        return metrics_paths, fewshot_paths, None
    reference_path = paths.run / "metrics" / "bigrec_free_reference_grounding.json"
    ref_cfg = evaluate.Config(catalog=catalog, input_dir=str(paths.results / "free" / "test.json"),
                              output=str(reference_path), base_model=ground_model(cfg, tuned),
                              index_path=str(paths.run / "index.reference.safetensors"), precision=cfg.precision)
    stages.run("evaluate_free_reference_grounding", stage_settings(ref_cfg), [reference_path],
               lambda: evaluate.run(ref_cfg), after=("generate_test_free", "prepare"))
    return metrics_paths, fewshot_paths, reference_path


def save_manifest(cfg: Config, run_dir: Path, infos: dict[str, dict], tuned: Tuned) -> None:
    """run.yaml for recommend and serve: the ranking chosen on validation (:func:`default_ranking`);
    their gammas come from the free run when there is one, as they decode freely."""
    from bigrec.app.run_manifest import RunManifest, domain_value, prepared_domain
    from bigrec.grounding.options import grounding_of, grounding_options

    gammas_from = infos.get("free") or infos.get("constrained") or infos["likelihood"]
    decoding, use_ci, weight, note = default_ranking(infos)
    def inside(path: str) -> str:  # run.yaml's paths are relative to the run folder
        return str(Path(path).resolve().relative_to(run_dir.resolve()))

    RunManifest(base_model=cfg.base_model if cfg.lora else inside(tuned.base_model), catalog="data/id2name.txt",
                index="index.safetensors", data="data", adapter=inside(tuned.adapter) if cfg.lora else None,
                sasrec="sasrec", domain=domain_value(prepared_domain(run_dir / "data")), layout=cfg.layout,
                precision=cfg.precision, num_beams=cfg.num_beams, prompt_titles=cfg.prompt_titles,
                **grounding_options(grounding_of(cfg)),
                ci_gamma=gammas_from.get("CI", {}).get("gammas", {}).get("single"),
                popularity_gamma=gammas_from.get("popularity", {}).get("gammas", {}).get("single"),
                use_ci=use_ci, ci_blend_weight=weight, ranking_note=note, decoding=decoding,
                likelihood_cf_weight=infos.get("likelihood", {}).get("likelihood_cf", {}).get("weight"),
                likelihood_content_weight=infos.get("likelihood", {}).get("likelihood_cf", {}).get("content_weight", 0.0),
                search_nodes=cfg.search_nodes, **cfg.likelihood_options(decoding)).save(run_dir)


def run(cfg: Config) -> int:
    from bigrec.evaluation.demo_report import build_demo_report, write_demo_report
    from bigrec.evaluation.metrics import TOPK
    from bigrec.evaluation.report import format_table, metrics_json, plot_metrics
    from bigrec.grounding.options import grounding_of

    started = time.perf_counter()
    paths = Paths(Path(cfg.run_dir))
    paths.run.mkdir(parents=True, exist_ok=True)
    stages = StageRunner(paths.run)
    tuned = tune_and_generate(cfg, stages, paths)
    index_and_baselines(cfg, stages, paths, tuned)
    metrics_paths, fewshot_paths, reference_path = evaluations(cfg, stages, paths, tuned)

    # Side by side on the same test rows: the baselines' exported scores, aligned by row identity.
    test_rows = io.read_json(paths.inputs("test"))
    compared = {protocol: side_by_side(paths.run, test_rows, metrics_paths[protocol], fewshot_rows(cfg),
                                       reference_path if protocol == "reference" else None, fewshot_paths[protocol],
                                       fewshot_label(cfg))
                for protocol in PROTOCOLS}
    infos = compared["reference"].pop("infos")  # decoding -> the evaluation details of its test file
    compared["unseen"].pop("infos")
    table = metrics_json(compared["reference"]["metrics"], TOPK)
    io.write_json(paths.run / "metrics" / "side_by_side.json", table)
    io.write_json(paths.run / "metrics" / "comparison.json", {"rows": len(test_rows), "topk": list(TOPK),
                                                              "protocols": compared})
    plot_metrics(table, paths.run / "metrics" / "side_by_side.png", TOPK)
    elapsed = time.perf_counter() - started
    grounding = grounding_of(cfg).describe()
    write_demo_report(paths.run, build_demo_report(compared, infos, to_dict(cfg), tuning_summary(cfg), grounding,
                                                   stages.timings, elapsed, notes=[n for n in [gate_note(cfg, paths)] if n]))
    save_manifest(cfg, paths.run, infos, tuned)
    print(format_table(table, TOPK))
    print(f"\nreport: {paths.run / 'report.md'}   plot: {paths.run / 'metrics' / 'side_by_side.png'}   "
          f"wall time {elapsed / 60:.1f} min")
    return 0


def tuning_summary(cfg: Config) -> str:
    """How the model was tuned, in words, with the epoch chosen on validation where one was."""
    if cfg.adapter is not None:
        return f"the LoRA adapter from {cfg.adapter} (trained on {cfg.sample} examples)"
    unit = "users' timelines" if cfg.layout == "timeline" else "examples"
    rows = f"all training {unit}" if cfg.sample < 0 else f"{cfg.sample} sampled {unit}"
    loss = ("every target of the timeline" if cfg.layout == "timeline"
            else "prompt and response" if cfg.train_on_inputs else "the response only")
    text = (f"{'LoRA' if cfg.lora else 'every weight tuned (full fine-tuning)'} on {rows}, {cfg.num_epochs} epoch(s) "
            f"at batch {cfg.batch_size}, lr {cfg.learning_rate}, loss on {loss}")
    chosen = Path(cfg.run_dir) / "epoch.json"
    if cfg.select_epoch and chosen.is_file():
        record = io.read_json(chosen)
        scores = ", ".join(f"epoch {e}: {v:.4f}" for e, v in record["valid_ndcg10"].items())
        text += (f"; epoch {record['epoch']} chosen on the validation rows' likelihood NDCG@10 "
                 f"({record['valid_rows']} rows; {scores})")
    return text
