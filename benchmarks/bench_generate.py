"""Beam-search generation speed: `bigrec generate` vs the reference recipe; prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_generate.py [--rows 64] [--lora_weights runs/demo/adapter]
        [--test_data runs/demo/data/test_5000.json] [--precision auto] [--max_new_tokens 64]

Both run in this process, on the same first ``--rows`` rows and the same prompt text
(:func:`bigrec.data.prompts.prompt_for_row`; the reference's inference prompt differs from its training
prompt by one space, which is not copied), with the same tokenizer (left padding):

* ours: the model as ``bigrec generate`` loads it (adapter merged in fp32; precision auto = fp32
  weights and decode steps, the prompts encoded in bf16 under autocast where the CPU has native
  bf16), rows sorted by prompt length as ``generate.run`` does, then
  :func:`bigrec.llm.generation.generate_batch`: the prompt's KV cache encoded once and shared by the
  beams, every beam stopping at the end of its title, at most ``--max_new_tokens``.
* reference (BIGRec ``inference.py``, restated): base model + ``PeftModel`` (not merged), fp32,
  rows in file order, batch 8 (``--ref_batch_size``), plain ``model.generate`` with 4 beams returning 4 sequences,
  ``max_new_tokens`` 128, no stopping criteria (beams end at EOS or the token limit), transformers
  copying each prompt once per beam, ``output_scores`` and ``return_dict_in_generate`` on as in
  the reference. ``do_sample=False`` is explicit; its GPU parts (fp16, torch.compile) are left
  out, and its ``num_return_sequences=1`` (which would mix rows up) is taken as 4.

Top-1 agreement: the first returned sequence of each row, both cut at the end of the title
(:func:`bigrec.llm.generation.cut_title`) and normalised, compared row by row.

Against the hardware: the machine's matmul peak is measured first (``benchmarks/peak.py``);
after the timed runs ours' prefill is timed again alone on the same batches, and the prefill
and the decode steps (the rest) print their FLOP rates as a share of the peak of ours' dtype.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peak import forward_flops, measure_peaks, share

from bigrec.llm.defaults import GENERATE_BATCH_SIZE, MAX_NEW_TOKENS, NUM_BEAMS, PRECISION

DEFAULT_ADAPTER = Path("runs/demo/adapter")


def default_test_data() -> str:
    for path in (Path("runs/demo/data/test_5000.json"), Path("/tmp/prep/ml-100k/test_5000.json")):
        if path.is_file():
            return str(path)
    return "/tmp/prep/ml-100k/test_5000.json"


def reference_model(base: str, adapter: str | None, dtype: torch.dtype = torch.float32):
    """The reference recipe's model and tokenizer: weights in ``dtype`` (the reference's fp32 on a CPU),
    the adapter unmerged (``PeftModel``), left padding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bigrec.llm.models import load_tokenizer

    tok = load_tokenizer(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tok


def reference_generate(model, tok, prompts: list[str], num_beams: int, max_new_tokens: int) -> tuple[list[str], int]:
    """The reference recipe for one batch: top-1 texts (cut at the title's end) and the steps it ran."""
    from bigrec.llm.generation import cut_title

    enc = tok(prompts, return_tensors="pt", padding=True, truncation=True)
    prompt_len = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
    texts = tok.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
    return [cut_title(texts[i * num_beams]) for i in range(len(prompts))], out.sequences.shape[1] - prompt_len


def phase_rates(model, tok, batches: list[list[str]], tops: list[str], num_beams: int,
                total_s: float, prefill_dtype: torch.dtype) -> dict[str, tuple[float, float]]:
    """(seconds, FLOPs) of ours' prefill (timed again alone: the prompt cache of every batch) and
    of the decode steps (the rest of ``total_s``; every beam of a batch runs until its last beam
    ends, taken as the longest top-1 text's tokens plus the stopping token)."""
    from bigrec.llm.kv_cache import shared_prompt

    prefill_s = prefill_flops = decode_flops = 0.0
    done = 0
    with torch.inference_mode():
        for prompts in batches:
            enc = tok(prompts, return_tensors="pt", padding=True)
            lengths = enc["attention_mask"].sum(1)
            start = time.perf_counter()
            relaid, _ = shared_prompt(model, enc, tok.pad_token_id, num_beams, 64, prefill_dtype)
            prefill_s += time.perf_counter() - start
            encoded = int(relaid["attention_mask"][:, :-1].sum())  # the shared prefix once, each row's rest
            prefill_flops += forward_flops(model, encoded, context=float(lengths.float().mean()) / 2, logits_tokens=0)
            steps = 1 + max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in tops[done:done + len(prompts)])
            done += len(prompts)
            decode_flops += forward_flops(model, steps * len(prompts) * num_beams,
                                          context=float(lengths.float().mean()) + steps / 2)
    return {"prefill": (prefill_s, prefill_flops), "decode": (total_s - prefill_s, decode_flops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--test_data", default=default_test_data())
    parser.add_argument("--base_model", default="smollm2-135m")
    parser.add_argument("--lora_weights", default=None,
                        help=f"adapter folder; default {DEFAULT_ADAPTER} if it holds an adapter, else none")
    parser.add_argument("--precision", default=PRECISION, help="ours' precision (the reference is always fp32)")
    parser.add_argument("--batch_size", type=int, default=GENERATE_BATCH_SIZE,
                        help="ours' rows per generate call (bigrec generate's default)")
    parser.add_argument("--ref_batch_size", type=int, default=8, help="the reference's rows per generate call")
    parser.add_argument("--num_beams", type=int, default=NUM_BEAMS)
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="ours' upper bound (bigrec's default)")
    parser.add_argument("--ref_max_new_tokens", type=int, default=128, help="the reference's max_new_tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = measure_peaks()
    print(peaks.line(), flush=True)

    from transformers.utils import logging as hf_logging

    from bigrec.data.prompts import normalize_title, prompt_for_row
    from bigrec.llm.generation import generate_batch
    from bigrec.llm.models import load_model, resolve_base_model, resolve_dtype

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    adapter = args.lora_weights
    if adapter is None and (DEFAULT_ADAPTER / "adapter_config.json").is_file():
        adapter = str(DEFAULT_ADAPTER)
    adapter = adapter if adapter and adapter.lower() != "none" else None
    base = resolve_base_model(args.base_model)
    rows = json.loads(Path(args.test_data).read_text())[:args.rows]
    prompts = [prompt_for_row(r) for r in rows]
    print(f"model {base}, adapter: {adapter or 'none (base model only)'}; {len(rows)} rows of {args.test_data}; "
          f"{torch.get_num_threads()} threads", flush=True)

    # Ours, as bigrec generate runs it.
    model, tok = load_model(base, args.precision, adapter, device="cpu", phase="decode")
    dtype = next(model.parameters()).dtype
    prefill_dtype = resolve_dtype(args.precision, "cpu", "prefill")
    generate_batch(model, tok, prompts[:1], args.num_beams, 2, prefill_dtype=prefill_dtype)  # warm-up
    lengths = [len(ids) for ids in tok(prompts)["input_ids"]]
    order = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))
    ours: dict[int, str] = {}
    started = time.perf_counter()
    for lo in range(0, len(order), args.batch_size):
        picks = order[lo:lo + args.batch_size]
        for i, beams in zip(picks, generate_batch(model, tok, [prompts[i] for i in picks], args.num_beams,
                                                  args.max_new_tokens, prefill_dtype=prefill_dtype), strict=True):
            ours[i] = beams[0]
    ours_s = time.perf_counter() - started
    print(f"ours: {len(rows)} rows in {ours_s:.1f}s", flush=True)
    phases = phase_rates(model, tok, [[prompts[i] for i in order[lo:lo + args.batch_size]]
                                      for lo in range(0, len(order), args.batch_size)],
                         [ours[i] for i in order], args.num_beams, ours_s, prefill_dtype)
    del model

    # The reference recipe.
    ref_model, ref_tok = reference_model(base, adapter)
    reference_generate(ref_model, ref_tok, prompts[:1], args.num_beams, 2)  # warm-up
    ref: list[str] = []
    steps: list[int] = []
    started = time.perf_counter()
    for lo in range(0, len(prompts), args.ref_batch_size):
        texts, n = reference_generate(ref_model, ref_tok, prompts[lo:lo + args.ref_batch_size], args.num_beams,
                                      args.ref_max_new_tokens)
        ref.extend(texts)
        steps.append(n)
        print(f"  reference batch {lo // args.ref_batch_size + 1}: {n} decoding steps", flush=True)
    ref_s = time.perf_counter() - started
    print(f"reference: {len(rows)} rows in {ref_s:.1f}s", flush=True)

    same = sum(normalize_title(ours[i]) == normalize_title(ref[i]) for i in range(len(rows)))
    n = len(rows)
    print()
    head = f"{'recipe':<10} {'dtype':<9} {'batch':>5} {'beams':>5} {'max new':>7} {'stop':<10} {'seconds':>8} {'rows/s':>7}"
    print(head)
    print("-" * len(head))
    print(f"{'ours':<10} {str(dtype).removeprefix('torch.'):<9} {args.batch_size:>5} {args.num_beams:>5} "
          f"{args.max_new_tokens:>7} {'title end':<10} {ours_s:>8.1f} {n / ours_s:>7.3f}")
    print(f"{'reference':<10} {'float32':<9} {args.ref_batch_size:>5} {args.num_beams:>5} {args.ref_max_new_tokens:>7} "
          f"{'EOS only':<10} {ref_s:>8.1f} {n / ref_s:>7.3f}")
    print(f"\nspeed-up {ref_s / ours_s:.2f}x; same top-1 title (both cut at the title's end) on {same}/{n} rows "
          f"= {same / n:.1%}; reference decoding steps per batch: {steps}")
    for name, (seconds, flops) in phases.items():
        in_dtype = prefill_dtype if name == "prefill" else dtype
        print(f"ours {name} ({str(in_dtype).removeprefix('torch.')}): {seconds:.1f}s, "
              f"{share(flops / seconds, peaks, in_dtype)}")
    empty_ours = sum(1 for i in range(n) if not normalize_title(ours[i]))
    print(f"empty top-1: ours {empty_ours}, reference {sum(1 for t in ref if not normalize_title(t))}")
    for i in range(min(5, n)):
        print(f"  row {i}: ours {ours[i]!r} | reference {ref[i]!r}")


if __name__ == "__main__":
    main()
