"""Reporting: the reference metrics JSON, a plain-text table and a PNG of NDCG@K and HR@K.

Inputs are ``{run: {"NDCG": [...], "HR": [...]}}`` with values in ``topk`` order; a top-level
``"topk"`` key (as in the metrics JSON) is skipped, so a loaded metrics file can be passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from bigrec.evaluation.metrics import TOPK
from bigrec.io import atomic_path

logger = logging.getLogger(__name__)

METRICS = ("NDCG", "HR")


def _runs(metrics: Mapping[str, Mapping], topk: Sequence[int]) -> dict[str, dict[str, list[float]]]:
    """Validated runs: each has NDCG and HR lists as long as topk."""
    runs = {}
    for name, run in metrics.items():
        if name == "topk":
            continue
        for key in METRICS:
            values = run.get(key) if isinstance(run, Mapping) else None
            if values is None or len(values) != len(topk):
                raise ValueError(f"run {name!r}: {key} needs {len(topk)} values (one per K in {list(topk)})")
        runs[name] = {key: [float(v) for v in run[key]] for key in METRICS}
    return runs


def metrics_json(runs: Mapping[str, Mapping], topk: Sequence[int] = TOPK) -> dict:
    """The reference metrics JSON: ``{"topk": [...], run: {"NDCG": [...], "HR": [...]}}``."""
    return {"topk": [int(k) for k in topk], **_runs(runs, topk)}


def format_table(metrics: Mapping[str, Mapping], topk: Sequence[int] = TOPK,
                 ks: Sequence[int] | None = None) -> str:
    """One line per run with NDCG@K then HR@K columns (4 decimals); ``ks`` picks a subset of topk."""
    runs = _runs(metrics, topk)
    ks = list(topk) if ks is None else list(ks)
    missing = [k for k in ks if k not in topk]
    if missing:
        raise ValueError(f"K {missing} not in topk {list(topk)}")
    cols = [(key, k, list(topk).index(k)) for key in METRICS for k in ks]
    header = ["run"] + [f"{key}@{k}" for key, k, _ in cols]
    body = [[name] + [f"{run[key][j]:.4f}" for key, _, j in cols] for name, run in runs.items()]
    width0 = max(len(r[0]) for r in [header, *body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(1, len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(width0)] + [c.rjust(w) for c, w in zip(cells[1:], widths, strict=True)])

    return "\n".join([line(header), line(["-" * width0] + ["-" * w for w in widths]), *map(line, body)])


def tied_line(tied_targets: Mapping[str, int], rows: int) -> str:
    """One line: per run, how many of its ``rows`` targets shared their score with another item
    (their metrics are the expectation over the tie's orders)."""
    counts = ", ".join(f"{run} {n}" for run, n in tied_targets.items())
    return f"Targets tied with other items, of {rows} rows (metrics average over the tie orders): {counts}"


def with_interval(value: float, bounds: Sequence[float] | None = None, signed: bool = False) -> str:
    """``0.0123 [0.0100, 0.0150]``, signed (``+0.0012 [-0.0005, +0.0031]``) for differences; the
    bare value without bounds."""
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return fmt.format(value) + (f" [{fmt.format(bounds[0])}, {fmt.format(bounds[1])}]" if bounds is not None else "")


def format_intervals(metrics: Mapping[str, Mapping], intervals: Mapping[str, Mapping], topk: Sequence[int] = TOPK,
                     ks: Sequence[int] = (10,), against: str | None = None) -> str:
    """A table of each run that has an interval: metric@K with its 95% interval and, where the run
    has a ``"paired"`` entry, the difference against ``against`` with its paired interval.

    ``intervals``: ``{run: {"ci": {"NDCG": [[lo, hi] per K], ...}, "paired": {"NDCG": {"diff", "ci"}, ...}}}``
    (:mod:`bigrec.evaluation.intervals`); runs without an entry are left out.
    """
    runs = _runs(metrics, topk)
    names = [name for name in intervals if name in runs]
    _, body = metrics_rows({name: runs[name] for name in names}, intervals, topk, ks)
    idx = [list(topk).index(k) for k in ks]
    header = ["run"] + [f"{key}@{k} [95% CI]" for key in METRICS for k in ks]
    if against is not None and any("paired" in iv for iv in intervals.values()):
        header += [f"{key}@{k} minus {against} [paired 95% CI]" for key in METRICS for k in ks]
        for cells, name in zip(body, names, strict=True):
            pair = intervals[name].get("paired")
            cells += [with_interval(pair[key]["diff"][j], pair[key]["ci"][j], signed=True) if pair else "-"
                      for key in METRICS for j in idx]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in [header, ["-" * w for w in widths], *body])


def plot_metrics(metrics: Mapping[str, Mapping], path: str | Path, topk: Sequence[int] = TOPK) -> Path:
    """Write a PNG with NDCG@K and HR@K against K, one line per run (Agg canvas, atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = _runs(metrics, topk)
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, works headless
    for ax, key in zip(fig.subplots(1, 2), METRICS, strict=True):
        for name, run in runs.items():
            ax.plot(list(topk), run[key], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xticks(list(topk), [str(k) for k in topk])
        ax.set_xlabel("K")
        ax.set_title(f"{key}@K")
        ax.grid(True, alpha=0.3)
    if runs:
        fig.axes[0].legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("wrote plot %s", path)
    return path


# --- one self-contained HTML file -------------------------------------------------------------

HTML_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;max-width:1100px;margin:24px auto;padding:0 20px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0;font-size:13.5px}
th,td{border-bottom:1px solid #d9dee6;padding:4px 8px;text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #d9dee6}p.note{color:#5b6575;font-size:13px}
details{margin:10px 0}summary{cursor:pointer;font-weight:600}
.beats{color:#1e7d32}.beaten{color:#b3261e}.tied{color:#5b6575}
"""


def html_table(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    """An HTML table; columns from ``numeric_from`` on are right-aligned."""
    from html import escape

    def cells(values: Sequence[object], tag: str) -> str:
        return "".join(f'<{tag}{" class=n" if i >= numeric_from else ""}>{escape(str(v))}</{tag}>'
                       for i, v in enumerate(values))

    return ("<table><tr>" + cells(headers, "th") + "</tr>"
            + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>")


def metrics_rows(metrics: Mapping[str, Mapping], intervals: Mapping[str, Mapping] | None,
                 topk: Sequence[int] = TOPK, ks: Sequence[int] = (10, 20)) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a metrics table: NDCG@K and HR@K, with the 95% interval where known."""
    runs = _runs(metrics, topk)
    idx = [(key, k, list(topk).index(k)) for key in METRICS for k in ks]
    rows = []
    for name, run in runs.items():
        iv = (intervals or {}).get(name)
        rows.append([name] + [with_interval(run[key][j], iv["ci"][key][j] if iv else None) for key, _, j in idx])
    return ["run"] + [f"{key}@{k}" for key, k, _ in idx], rows


def html_image(caption: str, png: str | Path) -> str:
    """A PNG inside the page as a data URI (the file opens from disk, nothing is fetched)."""
    import base64
    from html import escape

    data = base64.b64encode(Path(png).read_bytes()).decode()
    return f'<img alt="{escape(caption)}" src="data:image/png;base64,{data}">'


def write_html(path: str | Path, title: str, body: Sequence[str], images: Mapping[str, Path] | None = None) -> Path:
    """One HTML file that opens from disk: ``body`` parts (already HTML) and PNGs embedded as data URIs."""
    from html import escape

    parts = [f"<h1>{escape(title)}</h1>", *body]
    for caption, png in (images or {}).items():
        parts.append(f"<h2>{escape(caption)}</h2>{html_image(caption, png)}")
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def write_evaluation_report(output: Path, metrics: dict, details: dict) -> Path:
    """OUTPUT.html: per result file, its runs with 95% intervals, the paired differences, diagnostics."""
    from html import escape

    k10 = TOPK.index(10)

    body = [f"<p>Grounding: {escape(details['grounding'])}; {details['num_items']} items; "
            f"{'seen items left out' if details['exclude_history'] else 'every item ranked'}.</p>"]
    for name, info in details["files"].items():
        runs = {run: m for run, m in metrics.items() if run != "topk" and run.startswith(name)}
        body += [f"<h2>{escape(name)}</h2>", html_table(*metrics_rows(runs, info["intervals"]))]
        if "compare" in info:
            body.append("<ul>" + "".join(
                f"<li>{escape(run)} minus {escape(Path(info['compare']['scores']).name)}: NDCG@10 "
                f"{with_interval(iv['paired']['NDCG']['diff'][k10], iv['paired']['NDCG']['ci'][k10], signed=True)}</li>"
                for run, iv in info["intervals"].items()) + "</ul>")
        if "tied_targets" in info:
            body.append(f"<p>{escape(tied_line(info['tied_targets'], len(info['rows'])))}</p>")
        body.append(html_table(["diagnostic", "value"], [[k, v] for k, v in info["diagnostics"].items()], 2))
    return write_html(output.with_suffix(".html"), f"bigrec evaluate: {output.name}", body,
                      {"NDCG@K and HR@K": output.with_suffix(".png")})
