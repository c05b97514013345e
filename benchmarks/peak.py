"""The machine's measured matrix-product peak, and the FLOPs a causal LM spends per token.

Every benchmark calls :func:`measure_peaks` at its start and prints each phase's achieved
FLOP rate as a share of the peak of the dtype that phase computes in, so that a figure says
how close to the hardware it is, not only how it compares with the reference recipe.

    .venv/bin/python benchmarks/peak.py        # prints the peaks of this machine

The peak is the best of a few timed square products (fp32 and, where the CPU or GPU has it,
bf16) large enough to reach the fast kernels; no phase of a small model reaches it, but a
phase far below it has time to win.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    device: str
    fp32: float  # FLOP/s
    bf16: float | None  # None where the device has no native bf16

    def of(self, dtype: torch.dtype) -> float | None:
        return self.bf16 if dtype == torch.bfloat16 else self.fp32 if dtype == torch.float32 else None

    def line(self) -> str:
        bf16 = f"{self.bf16 / 1e9:,.0f}" if self.bf16 else "n/a"
        return (f"measured matmul peak on {self.device} ({torch.get_num_threads()} threads): "
                f"fp32 {self.fp32 / 1e9:,.0f} GFLOP/s, bf16 {bf16} GFLOP/s")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 1.0) -> float:
    """Best FLOP/s of ``n x n @ n x n`` products in ``dtype`` over about ``seconds``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection, page faults
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def has_bf16(device: str = "cpu") -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    from bigrec.llm.models import cpu_has_bf16

    return cpu_has_bf16()


def measure_peaks(device: str = "cpu", seconds: float = 1.0) -> Peaks:
    n = 4096 if device.startswith("cuda") else 2048
    fp32 = matmul_rate(torch.float32, device, n, seconds)
    bf16 = matmul_rate(torch.bfloat16, device, n, seconds) if has_bf16(device) else None
    return Peaks(device, fp32, bf16)


def linear_params(model) -> tuple[int, int]:
    """(weights of the transformer's linear layers, weights of the LM head): the parameters a
    token's forward pass multiplies by; embeddings are a lookup, norms are negligible."""
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    body = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            body += module.weight.numel()
    return body, head_params


def attention_flops(config, context: float) -> float:
    """FLOPs of one token's attention scores and weighted sum over ``context`` earlier tokens."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 4 * config.num_hidden_layers * heads * head_dim * context


def forward_flops(model, tokens: int, context: float = 0.0, logits_tokens: int | None = None) -> float:
    """FLOPs of a forward pass over ``tokens`` tokens attending to ``context`` tokens on average,
    with LM-head logits for ``logits_tokens`` of them (default: all)."""
    body, head = linear_params(model)
    logits = tokens if logits_tokens is None else logits_tokens
    return 2 * body * tokens + 2 * head * logits + attention_flops(model.config, context) * tokens


def share(rate: float, peaks: Peaks, dtype: torch.dtype) -> str:
    """``rate`` (FLOP/s) as ``'123 GFLOP/s = 45% of the bf16 peak'``."""
    peak = peaks.of(dtype)
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
    if not peak:
        return f"{rate / 1e9:,.0f} GFLOP/s"
    return f"{rate / 1e9:,.0f} GFLOP/s = {rate / peak:.0%} of the {name} peak"


if __name__ == "__main__":
    print(measure_peaks("cuda" if torch.cuda.is_available() else "cpu").line())
