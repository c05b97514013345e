"""The training loss's LM head: logits all at once (the reference's way) vs a chunk at a time; prints figures.

    .venv/bin/python benchmarks/bench_loss.py [--base_model smollm2-135m] [--positions 2048]
        [--chunks 128,512,2048] [--repeats 4] [--dtype bf16]

One micro-batch's head and loss, forward and backward, at the shape of ``--base_model``'s head
(its width and vocabulary, read from its config; random weights and hidden states) for
``--positions`` labelled positions (a full-data timeline micro-batch of 8 x 512 tokens has
about 2,000):

* ``all at once``: ``F.linear`` under autocast (or in ``--dtype``), float32 cross-entropy, as
  ``bigrec train --loss_chunk 0`` and the model's own loss compute it;
* ``chunk N``: :func:`bigrec.llm.labelled_logits.chunked_cross_entropy` with reused buffers, as
  ``bigrec train --loss_chunk N``.

For each: milliseconds per forward + backward (best of ``--repeats`` after one warm-up), the
process's minor page faults and kernel CPU time per call (fresh ``mmap``-ed blocks the kernel
zero-fills: on a CPU the cost that grows as a long training process ages), the ratio against
all-at-once, and the gradients' relative error against a float32 computation.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F


def head_shape(base_model: str) -> tuple[int, int]:
    from transformers import AutoConfig

    from bigrec.llm.models import resolve_base_model

    config = AutoConfig.from_pretrained(resolve_base_model(base_model))
    return config.hidden_size, config.vocab_size


def main(argv: list[str] | None = None) -> None:
    from bigrec.llm.labelled_logits import Workspace, chunked_cross_entropy

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base_model", default="smollm2-135m")
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--chunks", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    width, vocab = head_shape(args.base_model)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(vocab, width) * width ** -0.5)
    hidden = torch.randn(args.positions, width, requires_grad=True)
    targets = torch.randint(0, vocab, (args.positions,))
    print(f"head {vocab} x {width}, {args.positions} positions, {args.dtype}, {torch.get_num_threads()} threads")

    def run(fn):
        weight.grad = hidden.grad = None
        fn().backward()  # warm-up: first-use allocations and kernel choices
        best, faults, system = float("inf"), [], []
        for _ in range(args.repeats):
            weight.grad = hidden.grad = None
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn().backward()
            best = min(best, time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(after.ru_minflt - before.ru_minflt)
            system.append(after.ru_stime - before.ru_stime)
        return best, sum(faults) / len(faults), sum(system) / len(system), weight.grad.clone(), hidden.grad.clone()

    def at_once():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum") / args.positions

    exact = run(lambda: F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum") / args.positions)
    rows = [("all at once", run(at_once))]
    for chunk in (int(c) for c in args.chunks.split(",")):
        workspace = Workspace()
        rows.append((f"chunk {chunk}", run(lambda chunk=chunk, workspace=workspace: chunked_cross_entropy(
            hidden, weight, targets, chunk, dtype, workspace) / args.positions)))

    def error(got, truth):
        return ((got - truth).norm() / truth.norm()).item()

    base = rows[0][1][0]
    print(f"{'':14s} {'ms':>7s} {'vs all':>7s} {'faults':>9s} {'kernel ms':>10s} {'head grad err':>14s} "
          f"{'hidden grad err':>16s}")
    for name, (seconds, faults, system, d_weight, d_hidden) in rows:
        print(f"{name:14s} {seconds * 1000:7.0f} {base / seconds:6.2f}x {faults:9.0f} {system * 1000:10.0f} "
              f"{error(d_weight, exact[3]):14.2e} {error(d_hidden, exact[4]):16.2e}")


if __name__ == "__main__":
    main()
