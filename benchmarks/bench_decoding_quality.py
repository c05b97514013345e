"""Free vs catalogue-constrained decoding on a finished demo run: NDCG@10, HR@10, diversity, speed.

Every variant is grounded the way the run's report grounds (its ``run.yaml``: pooling, layer,
title text) against the run's item index.

Variants, all on the same first ``--rows`` test rows with the run's adapter:
free beam search + L2 grounding; constrained; constrained + D3 length correction;
constrained + CF guidance (the run's SASRec scores, weight chosen on validation NDCG@10).
Results the demo already produced are reused (their rows/s come from the demo's stage
records). Prints a table; asserts nothing.

    python benchmarks/bench_decoding_quality.py --run runs/demo --rows 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bigrec import io
from bigrec.app.run_manifest import RunManifest
from bigrec.grounding.options import grounding_of, grounding_options
from bigrec.llm.defaults import CONSTRAINED_BEAMS, NUM_BEAMS
from bigrec.stages import evaluate, generate


def generated(run: Path, name: str, split: str, rows: int, **options) -> tuple[Path, float | None]:
    """Generate ``split`` rows for a variant (or reuse them); returns (file, rows/s)."""
    out = run / "bench_decoding" / name / f"{split}.json"
    if out.is_file() and len(io.read_json(out)) == rows:
        return out, None
    manifest = RunManifest.load(run)
    cfg = generate.Config(test_data_path=str(run / "inputs" / f"{split}.json"), result_json_data=str(out),
                          base_model=manifest.base_model, lora_weights=str(run / "adapter"), limit=rows,
                          catalog=str(run / "data" / "id2name.txt"), **options)
    start = time.perf_counter()
    generate.run(cfg)
    return out, rows / (time.perf_counter() - start)


def scored(run: Path, result: Path, name: str) -> dict:
    """NDCG@10, HR@10 and diagnostics of one result file (plain metrics, no re-weighting)."""
    out = run / "bench_decoding" / "metrics" / f"{name}.json"
    manifest = RunManifest.load(run)  # the run's own grounding and item index, as its report uses
    cfg = evaluate.Config(catalog=str(run / "data" / "id2name.txt"), input_dir=str(result), output=str(out),
                          base_model=manifest.base_model, index_path=str(manifest.path(run, "index")),
                          **grounding_options(grounding_of(manifest)))
    evaluate.run(cfg)
    metrics, details = io.read_json(out), io.read_json(out.with_name(out.stem + ".details.json"))
    k10 = metrics["topk"].index(10)
    run_metrics = metrics[result.name]
    diag = details["files"][result.name]["diagnostics"]
    return {"NDCG@10": run_metrics["NDCG"][k10], "HR@10": run_metrics["HR"][k10],
            "distinct": diag["distinct_top1_share"], "exact": diag["exact_title_top1_share"]}


def demo_speed(run: Path, decoding: str, rows: int) -> tuple[Path | None, float | None]:
    """The demo's own test results for a decoding, and their rows/s from the stage record."""
    result = run / "results" / decoding / "test.json"
    record = run / "stages" / f"generate_test_{decoding}.json"
    if not result.is_file() or not record.is_file() or len(io.read_json(result)) != rows:
        return None, None
    return result, rows / json.loads(record.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--beams", type=int, default=CONSTRAINED_BEAMS, help="constrained beams (the demo's default)")
    parser.add_argument("--valid_rows", type=int, default=100, help="validation rows for choosing the CF weight")
    parser.add_argument("--cf_weights", default="0.5,1,2")
    args = parser.parse_args()
    run = Path(args.run)
    cf_test = str(run / "sasrec" / "scores" / "test_5000.safetensors")
    cf_valid = str(run / "sasrec" / "scores" / "valid_5000.safetensors")
    table = {}

    free, speed = demo_speed(run, "free", args.rows)
    if free is None:
        free, speed = generated(run, "free", "test", args.rows, decoding="free", num_beams=NUM_BEAMS)
    table[f"free ({NUM_BEAMS} beams) + L2 grounding"] = {**scored(run, free, "free"), "rows/s": speed}

    plain, speed = demo_speed(run, "constrained", args.rows)
    if plain is None:
        plain, speed = generated(run, "constrained", "test", args.rows, decoding="constrained", num_beams=args.beams)
    table[f"constrained ({args.beams} beams)"] = {**scored(run, plain, "constrained"), "rows/s": speed}

    corrected, speed = generated(run, "constrained_lc", "test", args.rows, decoding="constrained",
                                 num_beams=args.beams, length_correction=True)
    table["constrained + length correction"] = {**scored(run, corrected, "constrained_lc"), "rows/s": speed}

    best = None
    for weight in [float(w) for w in args.cf_weights.split(",")]:
        valid, _ = generated(run, f"cf_{weight}", "valid", args.valid_rows, decoding="constrained",
                             num_beams=args.beams, cf_scores=cf_valid, cf_weight=weight)
        ndcg = scored(run, valid, f"cf_{weight}_valid")["NDCG@10"]
        print(f"CF weight {weight}: validation NDCG@10 {ndcg:.4f} on {args.valid_rows} rows", flush=True)
        if best is None or ndcg > best[1]:
            best = (weight, ndcg)
    guided, speed = generated(run, f"cf_{best[0]}", "test", args.rows, decoding="constrained",
                              num_beams=args.beams, cf_scores=cf_test, cf_weight=best[0])
    table[f"constrained + CF guidance (weight {best[0]})"] = {**scored(run, guided, f"cf_{best[0]}"), "rows/s": speed}

    print(f"\n{args.rows} test rows of {run}")
    print(f"{'variant':45s} {'NDCG@10':>8s} {'HR@10':>7s} {'distinct':>9s} {'exact':>6s} {'rows/s':>7s}")
    for name, m in table.items():
        rate = f"{m['rows/s']:.2f}" if m["rows/s"] else "-"
        print(f"{name:45s} {m['NDCG@10']:8.4f} {m['HR@10']:7.4f} {m['distinct']:9.1%} {m['exact']:6.1%} {rate:>7s}")


if __name__ == "__main__":
    main()
