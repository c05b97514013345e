"""The markdown table: one row per check, the notes column from each row's details."""

from __future__ import annotations

from device.measure import cuda_available
from device.shapes import CHECKS


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, int):
        return str(x)
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.3g}"


def _gib(x) -> str:
    return "?" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "?" if x is None else f"{x:.1%}"


def notes(r: dict) -> str:
    d = r["details"]
    mem = "GPU mem" if cuda_available() else "RSS"
    parts = []
    if r["check"] == "pytest" and "passed" in d:
        parts.append(f"{d['passed']} passed, {d['failed']} failed, {d['skipped']} skipped")
    elif r["check"] == "train":
        parts.append(f"peak {mem} {_gib(d.get('bigrec_peak_gib'))} / {_gib(d.get('reference_peak_gib'))} GiB")
        parts.append(f"{d.get('bigrec_compute', '?')} / {d.get('reference_compute', '?')}")
        parts.append(f"{d['steps_timed']} steps timed after {d['steps_untimed']}, batch {d['batch_size']}/"
                     f"{d['micro_batch_size']}")
        parts.append(f"MFU {_pct(d.get('bigrec_mfu'))} / {_pct(d.get('reference_mfu'))}")
    elif r["check"] == "sweep":
        parts.append(f"MFU {_pct(d.get('mfu'))}; peak {mem} {_gib(d.get('peak_gib'))} GiB; {d.get('compute', '?')}")
        parts.append(f"{d['steps_timed']} steps timed after {d['steps_untimed']}; reference: the train row's")
    elif r["check"] == "likelihood":
        if "certified" in d:
            parts.append(f"top {d['candidates']} certified exact in {d['certified']}/{d['rows']} rows "
                         f"(--search_nodes {d['search_nodes']}); {d['distinct_top1']} distinct top-1")
        parts.append(f"catalogue {d['catalog']}, batch {d['batch']}, {d.get('dtype', '?')}; reference: its beam "
                     f"search, {d['beams']} beams x {d['new_tokens']} tokens, same model")
        parts.append(f"peak {mem} {_gib(d.get('peak_gib'))} GiB")
    elif r["check"] == "generate":
        if r["agreement"] is not None:
            parts.append(f"top-1 agrees {r['agreement']:.2f} ({d['same_top1']}/{d['rows']})")
        if "same_weights_same_top1" in d:
            parts.append(f"plain generate on bigrec's weights and batches {d['same_weights_same_top1']}/{d['rows']}")
        if "reference_self_same_top1" in d:
            parts.append(f"reference vs itself in bigrec's batches {d['reference_self_same_top1']}/{d['rows']}")
        parts.append(f"{d['rows']} rows, batch {d['batch']}, {d['beams']} beams, {d['new_tokens']} new tokens "
                     f"(ran {d.get('bigrec_new_tokens', '?')} / {d.get('reference_new_tokens', '?')})")
        parts.append(f"{d.get('bigrec_dtype', '?')} / {d.get('reference_dtype', '?')}")
        parts.append(f"peak {mem} {_gib(d.get('bigrec_peak_gib'))} / {_gib(d.get('reference_peak_gib'))} GiB")
    elif r["check"] == "embed":
        if r["agreement"] is not None:
            parts.append(f"nearest item agrees {r['agreement']:.2f} ({d['same_nearest']}/{d['rows']})")
        parts.append(f"{d['rows']} rows, catalogue {d['catalog']}, {d.get('dtype', '?')}")
    elif r["check"] == "accelerate":
        if "adapters_equal" in d:
            parts.append(f"both trained; adapters {'equal' if d['adapters_equal'] else 'DIFFER'} "
                         f"(max abs diff {d['adapter_max_abs_diff']:.1e}{', identical' if d['adapters_identical'] else ''})")
        if "same_top1" in d:
            parts.append(f"generate top-1 equal {d['same_top1']}/{d['generate_rows']}")
        parts.append(d["accelerate_config"])
    if r["error"]:
        parts.append(f"**{r['error']}**")
    return "; ".join(parts).replace("|", "/")


def table(rows: list[dict]) -> str:
    order = {"pytest": 0, **{check: 1 for check in CHECKS}, "accelerate": 2}
    lines = ["| check | status | bigrec | reference | bigrec/ref | unit | s | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: order[r["check"]]):
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else ""
        unit = r["unit"] or ""
        bigrec = _num(r["bigrec"]) if r["check"] not in ("pytest", "accelerate") else ""
        lines.append(f"| {r['name']} | {r['status']} | {bigrec} | {_num(r['reference'])} | {ratio} | "
                     f"{unit if bigrec else ''} | {_num(r['seconds'])} | {notes(r)} |")
    return "\n".join(lines)

