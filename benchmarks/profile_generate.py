"""Where a beam-search batch's time goes on this machine: bigrec's generation against plain
``model.generate``, under ``torch.profiler``; prints figures, asserts nothing.

    python benchmarks/profile_generate.py                   # a GPU: the SmolLM2-135M shape, random weights
    .venv/bin/python benchmarks/profile_generate.py --tiny  # a CPU: a tiny model, to try it

The model is built as ``benchmarks/device_check.py`` builds it (a config's shape, random weights,
a BPE tokenizer trained on made-up prompts). One batch of ``--rows`` prompts, 4 beams, exactly
``--new_tokens`` new tokens on both sides, after a warm-up. For each side it prints the wall
time, the host-device waits the profiler saw (``cudaStreamSynchronize``, ``cudaMemcpyAsync``
and friends, with their count and total time) and the operators that took the most host time.
First it times a bare wait (one small kernel, then a read of its result on the host), the price
of each sync on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from device import use_working_tree
from device.inference import title_end_never_stops
from device.measure import OnDevice, sync
from device.shapes import NUM_BEAMS, SHAPES, TINY_DIMS, build_model, make_rows, make_titles

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaEventSynchronize",
         "cudaStreamWaitEvent")


def wait_price(device: str, n: int = 200) -> float:
    """Mean seconds of one small kernel followed by reading its result on the host."""
    import torch

    x = torch.ones(1024, device=device)
    for _ in range(10):
        bool((x > 0).all())
    t0 = time.perf_counter()
    for _ in range(n):
        bool((x > 0).all())
    return (time.perf_counter() - t0) / n


def profile(label: str, run, device: str, top: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()  # warm-up
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    plain = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        run()
        sync()
    events = prof.key_averages()
    waits = [e for e in events if e.key in WAITS]
    print(f"\n## {label}: {plain * 1000:.0f} ms for the batch (unprofiled)")
    for e in waits:
        print(f"- {e.key}: {e.count} calls, {e.cpu_time_total / 1000:.1f} ms on the host")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the shape's architecture")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=15, help="operators listed per side")
    args = parser.parse_args()
    use_working_tree()  # reruns this script with src/ and tests/ on PYTHONPATH, quiet library logs

    import torch
    from bench_generate import reference_generate

    from bigrec.data.prompts import prompt_for_row
    from bigrec.llm.generation import generate_ids
    from bigrec.llm.models import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch, dims = SHAPES[args.shape]
    dims = {**dims, **TINY_DIMS} if args.tiny else dims
    rows = make_rows(args.rows, make_titles(400, seed=1), seed=20)
    prompts = [prompt_for_row(x) for x in rows]
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, torch {torch.__version__}; "
          f"{args.shape}{' (tiny)' if args.tiny else ''}, {args.rows} rows, {NUM_BEAMS} beams, {args.new_tokens} new tokens")
    print(f"one small kernel + a host read of its result: {wait_price(device) * 1e6:.0f} us")
    with tempfile.TemporaryDirectory() as tmp:
        base = build_model(Path(tmp) / "model", arch, dims, 400 if args.tiny else 4000, device)
        model, tok = load_model(base, "auto", device=device)
        model.generation_config.min_new_tokens = args.new_tokens
        with title_end_never_stops():
            profile("bigrec generate_ids", lambda: generate_ids(model, tok, prompts, NUM_BEAMS, args.new_tokens), device,
                    args.top)
        on_device = OnDevice(tok, device)
        profile("plain model.generate (the reference)",
                lambda: reference_generate(model, on_device, prompts, NUM_BEAMS, args.new_tokens), device, args.top)


if __name__ == "__main__":
    main()
