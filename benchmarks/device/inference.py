"""Beam search, embedding and likelihood-ranking checks, bigrec against the reference recipe."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator

from device.measure import (
    OnDevice,
    PeakMemory,
    cuda_available,
    fail,
    free_memory,
    held_gib,
    row,
    sync,
    time_limit,
)
from device.shapes import CANDIDATES, NUM_BEAMS, SEARCH_NODES, make_rows, make_titles


def likelihood_checks(shape: str, base: str, sizes: dict, args) -> Iterator[dict]:
    """One row per ``args.step_nodes`` value, yielded as each is measured, for likelihood ranking (the
    exact top ``CANDIDATES`` of a ``--catalog_size``-title catalogue per row), rows/s, against the
    reference recipe's beam search on the same model and rows (how the reference gets its list).
    The model loads and the reference is timed once, counted in the first row's seconds; each row's
    peak memory has the model's weights in it. A random model's distribution over titles is flat:
    the search's worst case, where most rows stop at ``SEARCH_NODES`` (the share certified exact
    is reported)."""
    import torch
    from bench_generate import reference_generate

    from bigrec.llm.layouts import get_layout
    from bigrec.llm.likelihood import TitleScorer
    from bigrec.llm.models import load_model

    started = time.perf_counter()
    n, batch = sizes["gen_rows"], sizes["gen_batch"]
    catalog = make_titles(sizes["catalog_size"], seed=3)
    layout = get_layout("window")
    prompts = [layout.prompt(x) for x in make_rows(n, catalog, seed=21)]
    device = "cuda" if cuda_available() else "cpu"
    model = scorer = None
    setup_error: Exception | None = None
    try:
        with time_limit(args.timeout, "loading the model and the reference beam search"), torch.no_grad():
            model, tok = load_model(base, "auto", device=device)
            trie = layout.trie(tok, catalog)
            model.generation_config.min_new_tokens = args.new_tokens  # fixed length, as in the generate check
            on_device = OnDevice(tok, device)
            reference_generate(model, on_device, prompts[:batch], NUM_BEAMS, args.new_tokens)  # warm-up
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                reference_generate(model, on_device, prompts[lo:lo + batch], NUM_BEAMS, args.new_tokens)
            sync()
            reference = n / (time.perf_counter() - t0)
        scorer = TitleScorer(model, tok, trie, batch_size=batch)
    except Exception as exc:
        setup_error = exc
    try:
        for step in args.step_nodes:
            r = row("likelihood", f"{shape}: likelihood ranking, {step} nodes a step", shape, "rows/s")
            d = r["details"]
            d.update(rows=n, batch=batch, catalog=len(catalog), candidates=CANDIDATES, search_nodes=SEARCH_NODES,
                     step_nodes=step, beams=NUM_BEAMS, new_tokens=args.new_tokens)
            try:
                if setup_error is not None:
                    raise setup_error
                d.update(dtype=str(model.dtype).removeprefix("torch."), trie_nodes=trie.num_nodes)
                r["reference"] = reference
                with time_limit(args.timeout, "likelihood ranking"), PeakMemory() as mem:
                    scorer.rank(prompts[:batch], CANDIDATES, step_nodes=step, max_nodes=SEARCH_NODES)  # warm-up
                    sync()
                    t0 = time.perf_counter()
                    rankings = []
                    for lo in range(0, n, batch):
                        rankings += scorer.rank(prompts[lo:lo + batch], CANDIDATES, step_nodes=step,
                                                max_nodes=SEARCH_NODES)
                    sync()
                    r["bigrec"] = n / (time.perf_counter() - t0)
                d.update(peak_gib=mem.gib, certified=sum(x.certified >= CANDIDATES for x in rankings),
                         distinct_top1=len({x.leaves[0] for x in rankings}))
                r["ratio"] = r["bigrec"] / reference
            except Exception as exc:
                fail(r, exc)
            r["seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            yield r
    finally:
        model = scorer = None
        free_memory()


@contextlib.contextmanager
def title_end_never_stops():
    """bigrec's TitleEndCriteria still decodes every beam at every step but stops none (fixed length)."""
    import torch

    from bigrec.llm import generation as gen

    original = gen.TitleEndCriteria.__call__

    def never(self, input_ids, scores=None, **kwargs):
        return torch.zeros_like(original(self, input_ids, scores, **kwargs))

    gen.TitleEndCriteria.__call__ = never
    try:
        yield
    finally:
        gen.TitleEndCriteria.__call__ = original


def generate_check(shape: str, base: str, adapter: str | None, sizes: dict, args) -> dict:
    from bench_generate import reference_generate, reference_model

    from bigrec.data.prompts import normalize_title, prompt_for_row
    from bigrec.llm.generation import cut_title, generate_ids
    from bigrec.llm.models import load_model, resolve_dtype

    r = row("generate", f"{shape}: beam search", shape, "rows/s")
    started = time.perf_counter()
    n, batch, new = sizes["gen_rows"], sizes["gen_batch"], args.new_tokens
    rows = make_rows(n, make_titles(400, seed=1), seed=20)
    prompts = [prompt_for_row(x) for x in rows]
    d = r["details"]
    d.update(rows=n, batch=batch, beams=NUM_BEAMS, new_tokens=new, adapter=bool(adapter))
    device = "cuda" if cuda_available() else "cpu"
    ours: dict[int, str] = {}
    ours_ids: dict[int, list[int]] = {}
    model = ref_model = None
    try:
        with time_limit(args.timeout, "bigrec generation"), title_end_never_stops(), PeakMemory() as mem:
            model, tok = load_model(base, "auto", adapter, device=device)
            model.generation_config.min_new_tokens = new
            dtype = next(model.parameters()).dtype
            lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
            order = sorted(range(n), key=lambda i: (-lengths[i], i))
            for lo in range(0, n, batch):  # warm-up: the same batches (kernels and plans for every shape)
                generate_ids(model, tok, [prompts[i] for i in order[lo:lo + batch]], NUM_BEAMS, new)
            widths = set()
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                picks = order[lo:lo + batch]
                ids = generate_ids(model, tok, [prompts[i] for i in picks], NUM_BEAMS, new)
                widths.add(ids.shape[1])
                texts = tok.batch_decode(ids, skip_special_tokens=True)
                for j, i in enumerate(picks):
                    ours[i] = cut_title(texts[j * NUM_BEAMS])
                    ours_ids[i] = ids[j * NUM_BEAMS].tolist()
            seconds = time.perf_counter() - t0
        r["bigrec"] = n / seconds
        d.update(bigrec_dtype=str(dtype).removeprefix("torch."), bigrec_new_tokens=sorted(widths),
                 bigrec_peak_gib=mem.gib, mean_prompt_tokens=sum(lengths) / n)
        # untimed, outside the peak: plain model.generate on these very weights and batches; what it
        # answers differently is bigrec's generation path alone (not the merge, not the batching)
        plain = OnDevice(tok, device)
        with time_limit(args.timeout, "plain generate on bigrec's weights"):
            for lo in range(0, n, batch):
                reference_generate(model, plain, [prompts[i] for i in order[lo:lo + batch]], NUM_BEAMS, new)
        d["same_weights_same_top1"] = sum(ours_ids[i] == seq
                                          for i, seq in zip(order, plain.decoded[::NUM_BEAMS], strict=True))
    except Exception as exc:
        fail(r, exc, "bigrec")
    model = None  # the model goes before the next one loads, even after a failure
    free_memory()
    ref: list[str] = []
    ref_ids: list[list[int]] = []
    try:
        dtype = resolve_dtype("auto", device)  # what bigrec generates in: fp32 on a CPU, bf16 on a GPU
        with time_limit(args.timeout, "reference generation"), PeakMemory() as mem:
            ref_model, ref_tok = reference_model(base, adapter, dtype)
            ref_model.to(device)
            ref_model.generation_config.min_new_tokens = new
            on_device = OnDevice(ref_tok, device)
            for lo in range(0, n, batch):  # warm-up: the same batches, as bigrec's
                reference_generate(ref_model, on_device, prompts[lo:lo + batch], NUM_BEAMS, new)
            steps = set()
            on_device.decoded.clear()
            sync()
            t0 = time.perf_counter()
            for lo in range(0, n, batch):
                texts, ran = reference_generate(ref_model, on_device, prompts[lo:lo + batch], NUM_BEAMS, new)
                ref.extend(texts)
                steps.add(ran)
            seconds = time.perf_counter() - t0
            ref_ids = on_device.decoded[::NUM_BEAMS]  # every row's first (best) sequence
            if ours_ids:  # untimed: the reference again, batched in bigrec's row order (the noise floor:
                on_device.decoded.clear()  # in bf16, other batch-mates and padding alone change some top-1s)
                for lo in range(0, n, batch):
                    reference_generate(ref_model, on_device, [prompts[i] for i in order[lo:lo + batch]],
                                       NUM_BEAMS, new)
                again = dict(zip(order, on_device.decoded[::NUM_BEAMS], strict=True))
                d["reference_self_same_top1"] = sum(again[i] == ref_ids[i] for i in range(n))
        r["reference"] = n / seconds
        d.update(reference_dtype=str(dtype).removeprefix("torch."), reference_new_tokens=sorted(steps),
                 reference_peak_gib=mem.gib)
    except Exception as exc:
        fail(r, exc, "reference")
    ref_model = None
    free_memory()
    if r["bigrec"] and r["reference"]:
        r["ratio"] = r["bigrec"] / r["reference"]
        same = sum(ours_ids[i] == ref_ids[i] for i in range(n))
        r["agreement"] = same / n
        d.update(same_top1=same, same_top1_title=sum(normalize_title(ours[i]) == normalize_title(ref[i])
                                                     for i in range(n)),
                 empty_top1_title=sum(1 for i in range(n) if not normalize_title(ours[i])),
                 example_bigrec=ours[0], example_reference=ref[0])
    d["gpu_gib_held_after"] = held_gib()
    r["seconds"] = time.perf_counter() - started
    return r


def embed_check(shape: str, base: str, sizes: dict, args) -> dict:
    import torch
    from bench_evaluate import reference_embed

    from bigrec.data.prompts import natural_title
    from bigrec.grounding.embedding import embed_texts
    from bigrec.llm.models import load_model

    r = row("embed", f"{shape}: embedding", shape, "rows/s")
    started = time.perf_counter()
    catalog = make_titles(sizes["catalog_size"], seed=3)
    rng = random.Random(30)
    queries = []
    for _ in range(sizes["embed_rows"]):
        title = natural_title(rng.choice(catalog))
        queries.append(title.rsplit(" (", 1)[0] if rng.random() < 0.3 else title)
    d = r["details"]
    d.update(rows=len(queries), catalog=len(catalog), bigrec_batch=64, reference_batch=16)
    device = "cuda" if cuda_available() else "cpu"
    model = None
    try:
        with time_limit(args.timeout, "embedding"), PeakMemory() as mem:
            model, tok = load_model(base, "auto", device=device)
            d["dtype"] = str(model.dtype).removeprefix("torch.")
            items = embed_texts(model, tok, catalog, 64)  # shared by both sides, not timed
            embed_texts(model, tok, queries[:8], 64)  # warm-up
            sync()
            t0 = time.perf_counter()
            ours = embed_texts(model, tok, queries, 64)
            r["bigrec"] = len(queries) / (time.perf_counter() - t0)
            on_device = OnDevice(tok, device)
            reference_embed(model, on_device, queries[:8])  # warm-up
            sync()
            t0 = time.perf_counter()
            ref = reference_embed(model, on_device, queries).float()
            r["reference"] = len(queries) / (time.perf_counter() - t0)
        d["peak_gib"] = mem.gib
        same = int((torch.cdist(ours, items).argmin(1) == torch.cdist(ref, items).argmin(1)).sum())
        r["agreement"] = same / len(queries)
        r["ratio"] = r["bigrec"] / r["reference"]
        d.update(same_nearest=same, max_abs_diff=float((ours - ref).abs().max()))
    except Exception as exc:
        fail(r, exc)
    model = None
    free_memory()
    d["gpu_gib_held_after"] = held_gib()
    r["seconds"] = time.perf_counter() - started
    return r

