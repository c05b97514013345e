"""Grounding + all-rank evaluation: `bigrec evaluate`'s core vs the reference evaluate logic; prints figures.

    .venv/bin/python benchmarks/bench_evaluate.py [--rows 5000] [--data /tmp/prep/ml-1m]
        [--predictions history|random] [--base_model smollm2-135m] [--precision auto]

No generation is needed: each test row's "predict" list is made up, either from the row's own
history (``history``, the default: the most recent watched titles, newest first), from the same
titles in the order a language model writes them (``natural``: "Shining, The (1980)" becomes
"The Shining (1980)", :func:`bigrec.data.prompts.natural_title`; 21% of ml-1m's titles change, so
those rows are no longer catalogue titles and must be embedded) or from random catalogue titles
(``random``), written quoted as a model writes them. Both sides read the same
result file, embed with the same model object (base model, no adapter, precision auto = fp32 on
a CPU) and rank against the same item embeddings (``bigrec.grounding.index.ensure_index``, timed on its
own because both need it):

* reference (BIGRec ``data/movie/evaluate.py``, restated): top-1 text with quotes stripped, batches
  of 16 through the full causal LM with ``output_hidden_states`` (no ``no_grad``, as there),
  last layer at the last token, ``torch.cdist``, a full double argsort of the distances, then
  Python loops over K and rows looking each target's rank up (title -> id dict).
* ours: :func:`bigrec.evaluation.results.read_results`, the ``Embedder`` (each distinct text once; a text
  that is exactly a catalogue title takes its index row), :func:`bigrec.grounding.ranking.ground`
  (distances, target rank by counting closer items) and :func:`bigrec.evaluation.metrics.ndcg_hr`. Also
  timed without the title shortcut (every distinct text embedded), for a like-for-like row.

Checks: the reference ranking + loops run on our distance matrix must give our numbers (to
1e-9); end to end (each side's own embeddings) the differences are printed as they are.

Embedding against the hardware: the machine's matmul peak is measured first
(``benchmarks/peak.py``); the embedding phase prints its seconds per distinct text against the
reference's loop (every text embedded on both sides) and its FLOP rate as a share of the peak
of the model's dtype. Where the CPU has native bf16, the same texts and the index are embedded
again by a bf16 copy of the model: its speed, and how often its grounding agrees with fp32's
(same nearest item; same target rank), which is why ``precision auto`` embeds in fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from peak import forward_flops, measure_peaks, share

from bigrec.data.prompts import natural_title
from bigrec.llm.defaults import EMBED_BATCH_SIZE, PRECISION

TOPK = (1, 3, 5, 10, 20, 50)


def make_predictions(rows: list[dict], titles: list[str], how: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for row in rows:
        if how in ("history", "natural"):
            picks = [titles[i] for i in reversed(row["history_item_id"][-4:])]
            if how == "natural":
                picks = [natural_title(t) for t in picks]
        else:
            picks = [titles[rng.randrange(len(titles))] for _ in range(4)]
        out.append({**row, "predict": [f'"{t}"' for t in picks]})
    return out


def reference_embed(model, tok, texts: list[str], batch: int = 16) -> torch.Tensor:
    """The reference: batches of 16 in file order, full model, last layer's last token, no no_grad."""
    tok.padding_side = "left"
    out = []
    for lo in range(0, len(texts), batch):
        enc = tok(texts[lo:lo + batch], return_tensors="pt", padding=True)
        hidden = model(enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True).hidden_states
        out.append(hidden[-1][:, -1, :].detach().cpu())
    return torch.cat(out, dim=0)


def reference_metrics(dist: torch.Tensor, test_data: list[dict], movie_dict: dict[str, int]) -> dict:
    """The reference: double argsort of all distances, Python loops over K and rows."""
    rank = dist.argsort(dim=-1).argsort(dim=-1)
    ndcg, hr = [], []
    for topk in TOPK:
        s = 0.0
        for i in range(len(test_data)):
            rank_id = rank[i][movie_dict[test_data[i]["output"].strip('"')]].item()
            if rank_id < topk:
                s = s + (1 / math.log(rank_id + 2))
        ndcg.append(s / len(test_data) / (1 / math.log(2)))
    for topk in TOPK:
        s = 0
        for i in range(len(test_data)):
            rank_id = rank[i][movie_dict[test_data[i]["output"].strip('"')]].item()
            if rank_id < topk:
                s = s + 1
        hr.append(s / len(test_data))
    return {"NDCG": ndcg, "HR": hr}


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for key in ("NDCG", "HR") for x, y in zip(a[key], b[key], strict=True))


def embedding_phase(model, tok, peaks, texts: list[str], reference_s: float, reference_texts: int, ours_s: float,
                    items: torch.Tensor, titles: list[str], targets, top1: list[str], batch: int) -> None:
    """Seconds per text against the reference's loop, the share of the peak, and bf16's speed and agreement."""
    from bigrec.evaluation.metrics import target_ranks
    from bigrec.grounding.embedding import embed_texts
    from bigrec.grounding.ranking import l2_distances
    from bigrec.llm.models import cpu_has_bf16

    lengths = [len(ids) for ids in tok(texts)["input_ids"]]
    flops = forward_flops(model, sum(lengths), context=sum(lengths) / len(lengths) / 2, logits_tokens=0)
    per_ref, per_ours = reference_s / reference_texts, ours_s / len(texts)
    print(f"\nembedding: reference {1e3 * per_ref:.1f} ms per text ({reference_texts} texts, batch 16, full LM), "
          f"ours {1e3 * per_ours:.1f} ms per distinct text ({len(texts)} texts, batch {batch}, {model.dtype}) "
          f"= {per_ref / per_ours:.2f}x; ours {share(flops / ours_s, peaks, model.dtype)}")
    if not cpu_has_bf16() or model.dtype != torch.float32:
        return
    fast = model.to(torch.bfloat16)
    started = time.perf_counter()
    vectors = embed_texts(fast, tok, texts, batch)
    seconds = time.perf_counter() - started
    fast_items = embed_texts(fast, tok, titles, batch)
    model.to(torch.float32)
    exact = embed_texts(model, tok, texts, batch)
    by_text = {t: i for i, t in enumerate(texts)}
    rows = [by_text[t] for t in top1 if t]
    kept = [i for i, t in enumerate(top1) if t]
    d32, d16 = l2_distances(exact, items), l2_distances(vectors, fast_items)
    same_item = (d32.argmin(1) == d16.argmin(1)).float().mean()
    r32 = target_ranks(d32[rows], [targets[i] for i in kept])
    r16 = target_ranks(d16[rows], [targets[i] for i in kept])
    print(f"embedding in bf16: {1e3 * seconds / len(texts):.1f} ms per distinct text = {per_ref * len(texts) / seconds:.2f}x "
          f"the reference, {share(flops / seconds, peaks, torch.bfloat16)}; against fp32: same nearest item for "
          f"{same_item:.1%} of texts, same target rank on {(r32.expected == r16.expected).float().mean():.1%} of rows, "
          f"target in the top 10 alike on {((r32.expected < 10) == (r16.expected < 10)).float().mean():.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--data", default="/tmp/prep/ml-1m", help="prepared ml-1m (prepared here if absent)")
    parser.add_argument("--predictions", choices=["history", "natural", "random"], default="history")
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--precision", default=PRECISION)
    parser.add_argument("--batch_size", type=int, default=EMBED_BATCH_SIZE, help="ours' texts per forward pass (evaluate's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_evaluate")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peaks()
    print(peaks.line(), flush=True)

    from transformers.utils import logging as hf_logging

    from bigrec.data.catalog import read_catalog
    from bigrec.evaluation.metrics import ndcg_hr
    from bigrec.evaluation.results import read_results
    from bigrec.grounding.embedding import Embedder
    from bigrec.grounding.index import ensure_index
    from bigrec.grounding.ranking import ground
    from bigrec.llm.models import load_model, resolve_base_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    data = Path(args.data)
    if not (data / "id2name.txt").is_file():
        from bigrec.cli import main as cli

        print(f"preparing ml-1m into {data} ...", flush=True)
        if cli(["prepare", "--dataset", "ml-1m", "--out", str(data)]):
            raise SystemExit("bigrec prepare failed")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    catalog = read_catalog(data / "id2name.txt")
    rows = json.loads((data / "test_5000.json").read_text())[:args.rows]
    result_path = work / "results" / "test.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(make_predictions(rows, catalog.titles, args.predictions, args.seed)))
    base = resolve_base_model(args.base_model)
    model, tok = load_model(base, args.precision, device="cpu")
    print(f"model {base} ({model.dtype}, {torch.get_num_threads()} threads); {len(rows)} rows of "
          f"{data / 'test_5000.json'}, predictions: {args.predictions} titles; catalogue {len(catalog)} items",
          flush=True)

    started = time.perf_counter()
    items = ensure_index(base, catalog.path, work / "index.safetensors", args.precision, model=model, tokenizer=tok,
                         batch_size=args.batch_size, overwrite=True)
    index_s = time.perf_counter() - started
    print(f"index: {len(catalog)} titles embedded in {index_s:.1f}s (shared by both sides, not in their times)",
          flush=True)

    # Ours: evaluate's grounding and metrics, with and without the exact-title shortcut.
    timings: dict[str, dict[str, float]] = {}
    ours: dict[str, dict] = {}
    for name, shortcut in (("ours", True), ("ours, no title shortcut", False)):
        started = time.perf_counter()
        results = read_results(result_path, catalog)
        known = {title: items[ids[0]] for title, ids in catalog.ids_by_title.items()} if shortcut else None
        embed = Embedder(model, tok, args.batch_size, known=known)
        dist, ranks, empty = ground(results.top1, results.targets, items, embed)
        ours[name] = ndcg_hr(ranks, TOPK)
        total = time.perf_counter() - started
        timings[name] = {"embed": embed.seconds, "rank": total - embed.seconds, "total": total,
                         "embedded": len(embed.cache) - (len(known) if known else 0)}
        print(f"{name}: {total:.1f}s ({timings[name]['embedded']} texts embedded)", flush=True)
        if shortcut:
            our_dist, our_ranks = dist, ranks

    # The reference.
    movie_dict = dict(zip(catalog.titles, range(len(catalog)), strict=True))
    started = time.perf_counter()
    test_data = json.loads(result_path.read_text())
    text = [r["predict"][0].strip('"') for r in test_data]
    predict_embeddings = reference_embed(model, tok, text)
    embedded = time.perf_counter()
    ref_dist = torch.cdist(predict_embeddings, items, p=2)
    reference = reference_metrics(ref_dist, test_data, movie_dict)
    done = time.perf_counter()
    timings["reference"] = {"embed": embedded - started, "rank": done - embedded, "total": done - started,
                            "embedded": len(text)}
    print(f"reference: {done - started:.1f}s", flush=True)

    # Checks: the reference's ranking and loops on our distances; end-to-end differences.
    same_inputs = reference_metrics(our_dist, test_data, movie_dict)
    ref_ranks = ref_dist.argsort(-1).argsort(-1).gather(1, torch.tensor([[movie_dict[r["output"].strip('"')]]
                                                                         for r in test_data])).squeeze(1)
    emb_gap = (predict_embeddings - torch.stack([items[catalog.ids_by_title[t][0]] if t in catalog.ids_by_title
                                                 else predict_embeddings[i] for i, t in enumerate(text)])).abs().max()

    print()
    head = f"{'side':<24} {'texts embedded':>14} {'embed s':>8} {'rank+metrics s':>14} {'total s':>8} {'speed-up':>8}"
    print(head)
    print("-" * len(head))
    ref_total = timings["reference"]["total"]
    for name in ("reference", "ours", "ours, no title shortcut"):
        t = timings[name]
        print(f"{name:<24} {t['embedded']:>14} {t['embed']:>8.2f} {t['rank']:>14.2f} {t['total']:>8.2f} "
              f"{ref_total / t['total']:>7.1f}x")
    print(f"\nindex embedding ({len(catalog)} titles, batch {args.batch_size}, both sides need it): {index_s:.1f}s")
    rank_speed = timings["reference"]["rank"] / timings["ours, no title shortcut"]["rank"]
    print(f"rank + metrics alone: reference {timings['reference']['rank']:.2f}s vs ours "
          f"{timings['ours, no title shortcut']['rank']:.3f}s = {rank_speed:.0f}x")
    print("\n" + f"{'K':>4} " + " ".join(f"{'NDCG@' + str(k):>10}" for k in TOPK) + "   "
          + " ".join(f"{'HR@' + str(k):>8}" for k in TOPK))
    for name, m in (("ours", ours["ours"]), ("ref", reference), ("ref*", same_inputs)):
        print(f"{name:>4} " + " ".join(f"{v:>10.6f}" for v in m["NDCG"]) + "   "
              + " ".join(f"{v:>8.4f}" for v in m["HR"]))
    gap = max_diff(ours["ours"], same_inputs)
    print(f"\nref* = the reference's double argsort + loops on our distances: max |diff| {gap:.2e} "
          f"-> {'EQUAL' if gap <= 1e-9 else 'NOT EQUAL'} to 1e-9")
    print(f"ours with vs without the title shortcut: max |diff| {max_diff(ours['ours'], ours['ours, no title shortcut']):.2e}")
    embedding_phase(model, tok, peaks, texts=sorted({t for t in results.top1 if t}), reference_s=timings["reference"]["embed"],
                    reference_texts=len(text), ours_s=timings["ours, no title shortcut"]["embed"], items=items,
                    titles=catalog.titles, targets=results.targets, top1=results.top1, batch=args.batch_size)
    print(f"end to end (each side's own embeddings): max |diff| {max_diff(ours['ours'], reference):.2e}; "
          f"target rank differs on {int((ref_ranks != our_ranks.expected).sum())}/{len(rows)} rows; largest gap between a "
          f"reference prediction embedding and the index row of the same title {float(emb_gap):.2e}")


if __name__ == "__main__":
    main()
