"""How grounding's embedding changes BIGRec's metrics, on the generations of a finished demo run.

The same free generations (``RUN/results/free/{valid,test}.json``) are grounded with several
embeddings of the base model (:class:`bigrec.grounding.embedding.Grounding`: which layer, last token or mean
over tokens, bare or natural titles) and L2 distance, as ``bigrec evaluate`` does. Prints
NDCG@10 / HR@10 / HR@50 on validation and test per grounding, marks the one with the best
validation NDCG@10 (choose there, read test), and where a few frequent generations land.
Asserts nothing.

    python benchmarks/bench_grounding.py --run runs/demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bigrec.app.run_manifest import RunManifest
from bigrec.data.catalog import read_catalog
from bigrec.evaluation.metrics import ndcg_hr, target_ranks
from bigrec.evaluation.results import read_results
from bigrec.grounding.embedding import Grounding, embed_texts
from bigrec.grounding.ranking import l2_distances
from bigrec.llm.models import load_model

GRID = [Grounding("last", -1, "bare"), Grounding("last", -1, "natural"), Grounding("mean", -1, "bare"),
        Grounding("mean", -1, "natural"), Grounding("mean", 5, "natural"), Grounding("mean", 10, "natural"),
        Grounding("mean", 15, "natural"), Grounding("mean", 20, "natural"), Grounding("last", 10, "natural")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="finished demo run folder")
    parser.add_argument("--decoding", default="free", help="results/<decoding>/ to ground")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    manifest = RunManifest.load(run)
    catalog = read_catalog(run / "data" / "id2name.txt")
    splits = {s: read_results(run / "results" / args.decoding / f"{s}.json", catalog) for s in ("valid", "test")}
    model, tok = load_model(manifest.base_model, "fp32")
    layers = model.config.num_hidden_layers
    print(f"run {run}: {len(catalog)} items; rows valid {len(splits['valid'].rows)}, test {len(splits['test'].rows)};"
          f" {layers} layers")
    rows = []
    for grounding in [g for g in GRID if g.layer <= layers]:
        start = time.perf_counter()
        items = embed_texts(model, tok, catalog.titles, grounding=grounding)
        scores = {}
        for split, res in splits.items():
            texts = sorted({t for t in res.top1 if t})
            vecs = dict(zip(texts, embed_texts(model, tok, texts, grounding=grounding), strict=True))
            queries = torch.stack([vecs.get(t, torch.zeros(items.shape[1])) for t in res.top1])
            dist = l2_distances(queries, items)
            ranks = target_ranks(dist, res.targets)
            ranks[torch.tensor([not t for t in res.top1])] = len(catalog)  # an empty generation is a miss
            m = ndcg_hr(ranks)
            scores[split] = (m["NDCG"][3], m["HR"][3], m["HR"][5])
            if split == "test":
                nearest = dist.argmin(1).tolist()
                common = sorted(set(res.top1), key=res.top1.count, reverse=True)[:3]
                landing = "; ".join(f"{t!r} -> {catalog.titles[nearest[res.top1.index(t)]]!r}" for t in common)
        rows.append((grounding, scores, landing, time.perf_counter() - start))
        print(f"  {grounding.describe()}: valid NDCG@10 {scores['valid'][0]:.4f}, test NDCG@10 "
              f"{scores['test'][0]:.4f} ({rows[-1][3]:.0f}s)", flush=True)
    best = max(rows, key=lambda r: r[1]["valid"][0])[0]
    print("\n| grounding | valid N@10 | valid H@10 | test N@10 | test H@10 | test H@50 |")
    print("|---|---|---|---|---|---|")
    for grounding, s, _, _ in rows:
        mark = " (best on valid)" if grounding == best else ""
        print(f"| {grounding.describe()}{mark} | {s['valid'][0]:.4f} | {s['valid'][1]:.4f} | {s['test'][0]:.4f} | "
              f"{s['test'][1]:.4f} | {s['test'][2]:.4f} |")
    print("\nwhere the most frequent test generations land (nearest item):")
    for grounding, _, landing, _ in rows:
        print(f"  {grounding.describe()}: {landing}")


if __name__ == "__main__":
    main()
