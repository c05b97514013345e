"""The ``bigrec demo`` report: one model of what the demo measured, rendered to Markdown and HTML.

:func:`build_demo_report` gathers, once, what both files show: the run in a paragraph, the
verdicts (the lead BIGRec row against each baseline, from the paired 95% interval of NDCG@10
under each ranking protocol), a chart of every method's NDCG@10 with its interval, the full
tables, where each decoding stands and its diagnostics, the settings and the stage times.
:func:`render_markdown` and :func:`render_html` only lay that out; :func:`write_demo_report`
writes the chart, ``report.md`` and ``report.html``.

Inputs are plain data, not the demo's ``Config``: ``compared`` is the demo's comparison,
``{protocol: {"metrics", "intervals", "paired"}}`` (``metrics/comparison.json``'s
``"protocols"``), ``infos`` the evaluation details of each decoding's test file, ``settings``
the demo's settings as a dict (``bigrec.config.to_dict``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from bigrec import io
from bigrec.evaluation.comparison import describe_pairs
from bigrec.evaluation.metrics import TOPK
from bigrec.evaluation.report import METRICS, html_image, html_table, metrics_rows, with_interval, write_html

logger = logging.getLogger(__name__)

# protocol -> (what it is, in the headings); the order the report shows them in
PROTOCOL_TITLES = {"reference": "the reference protocol (every item ranked)",
                   "unseen": "each user's seen items left out of the ranking"}
PROTOCOL_WHEN = {"reference": "With every item ranked (the reference protocol)",  # opens the protocol's headline
                 "unseen": "With each user's seen items left out of the ranking"}
CHART = "ndcg10_intervals.png"  # beside the demo's side_by_side.png, in the run's metrics/
CURVES = "side_by_side.png"
CHART_CAPTION = "NDCG@10 with its 95% interval, per method"
CURVES_CAPTION = "NDCG@K and HR@K, every item ranked"
RANDOM = "Random"
REFERENCE_GROUNDING = "BIGRec (free), reference grounding"


@dataclass
class Verdict:
    """``method`` minus ``baseline`` at NDCG@10 on the same rows, with its paired 95% interval."""

    method: str
    baseline: str
    diff: float
    low: float
    high: float

    @property
    def word(self) -> str:
        """"beats" when the whole interval lies above 0, "is beaten by" below, else "cannot be told apart from"."""
        return "beats" if self.low > 0 else "is beaten by" if self.high < 0 else "cannot be told apart from"

    @property
    def sentence(self) -> str:
        return (f"{self.method} {self.word} {self.baseline}: NDCG@10 difference "
                f"{with_interval(self.diff, (self.low, self.high), signed=True)} (paired 95% interval).")


@dataclass
class Protocol:
    """One ranking protocol's part of the report."""

    key: str
    title: str
    verdicts: list[Verdict]
    best: str  # the sentence naming the highest NDCG@10
    headers: list[str]  # the intervals table: NDCG and HR at 10 and 20, each with its 95% interval
    rows: list[list[str]]
    pairs: list[str]  # every paired difference, one line each (bigrec.evaluation.comparison.describe_pairs)
    chart: list[tuple[str, float, tuple[float, float] | None]]  # (method, NDCG@10, interval or None)

    @property
    def headline(self) -> str:
        """The verdicts counted in one sentence, then the best NDCG@10."""
        if not self.verdicts:
            return self.best
        method = self.verdicts[0].method
        counts = {word: sum(v.word == word for v in self.verdicts)
                  for word in ("beats", "is beaten by", "cannot be told apart from")}
        said = [f"{word} {n}" for word, n in counts.items() if n]
        said = said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]
        when = PROTOCOL_WHEN.get(self.key, f"Under {self.title}")
        return (f"{when}, {method} {said} of the {len(self.verdicts)} baselines at NDCG@10. "
                + self.best)


@dataclass
class DemoReport:
    """Everything ``report.md`` and ``report.html`` show, built once by :func:`build_demo_report`."""

    summary: str
    rows: int
    lead: str | None
    protocols: list[Protocol]
    table: tuple[list[str], list[list[str]]]  # NDCG@K and HR@K at every K, every item ranked: headers, rows
    standing: list[str]  # where each decoding stands against a random ranking and the references
    decodings: dict[str, list[str]]  # decoding -> its diagnostics and gammas, one sentence each
    settings: list[tuple[str, object]]
    timings: dict[str, float]


def certified_line(share: float, search_nodes: int) -> str:
    """Where likelihood ranking's budget cut its search: a ranking past it is not the exact one."""
    return (f"Likelihood search: the top 10 is provably exact in {share:.1%} of rows; elsewhere the search ran out "
            f"of its {search_nodes} title tokens a row (--search_nodes) and ranks the titles it did not reach by "
            "their bound")


def run_summary(settings: Mapping, decodings: Sequence[str], tuning: str, grounding: str, elapsed: float) -> str:
    """The report's first paragraph: data, model, training, rows, decodings, grounding, wall time."""
    s = settings
    beams = {"free": f"{s['num_beams']} beams, free beam search + L2 grounding"
                     + (f" (nearest of the first {s['ground_beams']} beams)" if s.get("ground_beams", 1) > 1 else ""),
             "constrained": f"{s['constrained_beams']} beams constrained to catalogue titles, beams' items ranked "
                            "first, then the rest by L2 distance to the top beam",
             "likelihood": "every title ranked by its log-probability (a best-first search of the catalogue's "
                           f"trie, at most {s['search_nodes']} title tokens a row)"
                           + (f", minus {s['prior_weight']} x its no-history log-probability" if s.get("prior_weight")
                              else "")
                           + (", the row's history titles left out" if s.get("exclude_history") else "")}
    return (f"Dataset {s['dataset']}, base model {s['base_model']}, {tuning}; "
            f"{s['test_rows']} test rows; decoding: " + "; ".join(f"{d}: {beams.get(d, d)}" for d in decodings) + ". "
            f"Grounding embeds titles with the base model: {grounding}. Wall time {elapsed / 60:.1f} min.")


def lead_method(metrics: Mapping[str, Mapping], decodings: Sequence[str]) -> str | None:
    """The BIGRec row the verdicts speak for: free decoding's, else constrained's, else the first decoding's."""
    return next((name for name in (f"BIGRec ({d})" for d in ("free", "constrained", *decodings)) if name in metrics),
                None)


def verdicts_of(paired: Mapping[str, Mapping], lead: str | None, k: int = 10) -> list[Verdict]:
    """The lead row against each result it was paired with (``"LEAD minus OTHER"``), at NDCG@k."""
    if lead is None:
        return []
    j = list(TOPK).index(k)
    prefix = f"{lead} minus "
    found = []
    for name, diff in paired.items():
        if name.startswith(prefix):
            low, high = diff["NDCG"]["ci"][j]
            found.append(Verdict(lead, name[len(prefix):], float(diff["NDCG"]["diff"][j]), float(low), float(high)))
    return found


def protocol_part(key: str, part: Mapping, lead: str | None) -> Protocol:
    j = list(TOPK).index(10)
    metrics, intervals = part["metrics"], part["intervals"]
    chart = []
    for name, m in metrics.items():
        ci = intervals.get(name, {}).get("ci")
        chart.append((name, float(m["NDCG"][j]), tuple(ci["NDCG"][j]) if ci else None))
    best_name, best_value, best_ci = max(chart, key=lambda c: c[1])
    best = (f"The highest NDCG@10 is {best_name}'s, {with_interval(best_value, best_ci)}"
            + (" (95% interval)." if best_ci else "."))
    headers, rows = metrics_rows(metrics, intervals)
    return Protocol(key, PROTOCOL_TITLES.get(key, key), verdicts_of(part["paired"], lead), best, headers, rows,
                    describe_pairs(part["paired"]), chart)


def standing_lines(metrics: Mapping[str, Mapping], decodings: Sequence[str]) -> list[str]:
    """Each decoding's NDCG@10 against a random ranking, the reference grounding, popularity and SASRec."""
    j = list(TOPK).index(10)
    ndcg10 = {name: m["NDCG"][j] for name, m in metrics.items()}
    rand = ndcg10.get(RANDOM, float("nan"))
    lines = []
    for decoding in decodings:
        plain = ndcg10.get(f"BIGRec ({decoding})", 0.0)
        verdict = ("above" if plain > rand * 1.5 else "not clearly above") + " a random ranking"
        lines.append(f"NDCG@10: BIGRec ({decoding}) {plain:.4f} ({verdict}).")
    if REFERENCE_GROUNDING in ndcg10:
        lines.append("NDCG@10 of the same free generations grounded the reference way (last layer, last token, "
                     f"bare titles): {ndcg10[REFERENCE_GROUNDING]:.4f}.")
    lines.append(f"NDCG@10 of the references: random ranking {rand:.4f}, popularity "
                 f"{ndcg10.get('Popularity', float('nan')):.4f}, SASRec {ndcg10.get('SASRec', float('nan')):.4f}.")
    return lines


def decoding_facts(info: Mapping, search_nodes: int) -> list[str]:
    """A decoding's diagnostics (distinct, exact and empty top-1 generations, copies of the history,
    the most frequent ones, likelihood's certified share) and its re-weighting gammas."""
    diag = info["diagnostics"]
    copies = diag.get("history_copy_top1_share")
    facts = [f"{diag['distinct_top1_share']:.1%} of top-1 generations are distinct, "
             f"{diag['exact_title_top1_share']:.1%} are exact catalogue titles, {diag['empty_top1']} are empty"
             + ("." if copies is None else f"; {copies:.1%} copy a title from the user's own history."),
             "Most frequent top-1 generations: " + "; ".join(f'"{t}" x{c}' for t, c in diag["most_frequent_top1"][:10])]
    if diag.get("certified_top10_share") is not None:
        facts.append(certified_line(diag["certified_top10_share"], search_nodes) + ".")
    if "likelihood_cf" in info:
        cf = info["likelihood_cf"]
        facts.append(f"Likelihood + SASRec (chosen on validation, NDCG@10 {cf['valid_ndcg10']:.4f}): SASRec's weight "
                     f"{cf['weight']}, the last title's {cf.get('content_weight', 0.0)}; terms kept: "
                     f"{', '.join(cf.get('terms', ['likelihood', 'SASRec']))}.")
    for kind in ("popularity", "CI"):
        if kind in info:
            gammas = info[kind]["gammas"]
            blend = f"; blend weight {info[kind]['blend']['weight']}" if "blend" in info[kind] else ""
            facts.append(f"{kind} re-weighting (chosen on validation): single gamma (by validation NDCG@10) "
                         f"{gammas['single']}; per-K NDCG gammas {gammas['NDCG']}{blend}.")
    return facts


def full_table(metrics: Mapping[str, Mapping]) -> tuple[list[str], list[list[str]]]:
    """NDCG@K then HR@K at every K, one row per method (4 decimals)."""
    headers = ["run"] + [f"{key}@{k}" for key in METRICS for k in TOPK]
    return headers, [[name] + [f"{v:.4f}" for key in METRICS for v in m[key]] for name, m in metrics.items()]


def build_demo_report(compared: Mapping[str, Mapping], infos: Mapping[str, Mapping], settings: Mapping,
                      tuning: str, grounding: str, timings: Mapping[str, float], elapsed: float,
                      notes: Sequence[str] = ()) -> DemoReport:
    """The report's model from what the demo computed.

    ``compared``: ``{protocol: {"metrics", "intervals", "paired"}}`` as the demo's ``side_by_side``
    returns each protocol (without ``"infos"``); ``infos``: decoding -> the evaluation details of its
    test file; ``settings``: the demo's settings (``dataset``, ``base_model``, ``test_rows``,
    ``num_beams``, ``ground_beams``, ``constrained_beams``, ``search_nodes``, ``prior_weight``,
    ``exclude_history`` are read; all are listed); ``tuning``: how the model was tuned, in
    words; ``grounding``: the grounding, described; ``timings``: stage -> seconds (0 = reused);
    ``notes``: sentences the summary ends with (what the demo left out, and why)."""
    decodings = list(infos)
    reference = compared["reference"]["metrics"]
    lead = lead_method(reference, decodings)
    order = [p for p in PROTOCOL_TITLES if p in compared] + [p for p in compared if p not in PROTOCOL_TITLES]
    return DemoReport(
        summary=" ".join([run_summary(settings, decodings, tuning, grounding, elapsed), *notes]),
        rows=int(settings["test_rows"]), lead=lead,
        protocols=[protocol_part(p, compared[p], lead) for p in order],
        table=full_table(reference), standing=standing_lines(reference, decodings),
        decodings={d: decoding_facts(info, settings["search_nodes"]) for d, info in infos.items()},
        settings=sorted(settings.items()), timings={k: float(v) for k, v in timings.items()})


# --- the chart ------------------------------------------------------------------------------------

def plot_intervals(protocols: Sequence[Protocol], path: str | Path, lead: str | None = None) -> Path:
    """A PNG of horizontal bars, one per method, of NDCG@10 with its 95% interval as an error bar;
    one panel per protocol, the lead row in its own colour (Agg canvas, atomic write)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max((len(p.chart) for p in protocols), default=1)
    fig = Figure(figsize=(6 * max(len(protocols), 1) + 3, 0.34 * n + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(protocols), 1), sharey=True, squeeze=False)[0]
    for ax, part in zip(axes, protocols, strict=False):
        names = [name for name, _, _ in part.chart]
        colours = ["#c0392b" if name == lead else "#e59866" if name.startswith("BIGRec") else "#5d6d7e"
                   for name in names]
        ax.barh(range(len(names)), [value for _, value, _ in part.chart], color=colours)
        ranged = [(y, value, ci) for y, (_, value, ci) in enumerate(part.chart) if ci is not None]
        if ranged:  # an expected value (Random) has no interval and no error bar
            ax.errorbar([value for _, value, _ in ranged], [y for y, _, _ in ranged], fmt="none", ecolor="black",
                        elinewidth=1, capsize=3, xerr=[[max(value - ci[0], 0.0) for _, value, ci in ranged],
                                                       [max(ci[1] - value, 0.0) for _, value, ci in ranged]])
        ax.set_yticks(range(len(names)), names, fontsize="small")
        ax.set_ylim(len(names) - 0.5, -0.5)  # the first method on top, as in the tables
        ax.set_xlabel("NDCG@10 (bars: 95% interval)")
        ax.set_title(part.title[0].upper() + part.title[1:], fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    logger.info("wrote chart %s", path)
    return path


# --- the two renderers ----------------------------------------------------------------------------

def interval_note(rows: int) -> str:
    return (f"Bootstrap over the {rows} test rows (1,000 resamples, seed 0); a paired difference uses the same "
            "resamples for both results.")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def render_markdown(report: DemoReport, chart: str | None = None) -> str:
    """report.md: the summary, the verdicts, the chart (``chart``: its path relative to the report),
    where BIGRec stands, then the full tables, the diagnostics, the settings and stage times."""
    lines = ["# bigrec demo report", "", report.summary, "", "## Verdicts", ""]
    for part in report.protocols:
        lines += [f"### {part.title[0].upper() + part.title[1:]}", "", part.headline, ""]
        lines += [f"- {v.sentence}" for v in part.verdicts] + ([""] if part.verdicts else [])
    if chart is not None:
        lines += [f"![{CHART_CAPTION}]({chart})", ""]
    lines += ["## Where BIGRec stands", "", *[f"- {line}" for line in report.standing], ""]
    lines += [f"## {CURVES_CAPTION}", "", markdown_table(*report.table), ""]
    for part in report.protocols:
        lines += [f"## 95% intervals and paired differences, {part.title}", "", interval_note(report.rows), "",
                  markdown_table(part.headers, part.rows), ""]
        lines += [f"- {line}" for line in part.pairs] + [""]
    for decoding, facts in report.decodings.items():
        lines += [f"## Decoding: {decoding}", "", *[f"- {fact}" for fact in facts], ""]
    lines += ["## Settings", "", markdown_table(["setting", "value"], report.settings), ""]
    lines += ["## Stage times (s; 0 = reused)", "", ", ".join(f"{k} {v:.0f}" for k, v in report.timings.items()), ""]
    return "\n".join(lines)


def render_html(report: DemoReport, chart: Path | None = None, curves: Path | None = None) -> list[str]:
    """report.html's body parts: the same sections as :func:`render_markdown`, the chart (a PNG)
    under the verdicts, the full tables and the NDCG@K/HR@K plot (``curves``) folded in ``<details>``."""
    css = {"beats": "beats", "is beaten by": "beaten", "cannot be told apart from": "tied"}
    body = [f"<p>{escape(report.summary)}</p>", "<h2>Verdicts</h2>"]
    for part in report.protocols:
        body += [f"<h3>{escape(part.title[0].upper() + part.title[1:])}</h3>", f"<p>{escape(part.headline)}</p>"]
        if part.verdicts:
            body.append("<ul>" + "".join(f'<li class="{css[v.word]}">{escape(v.sentence)}</li>'
                                         for v in part.verdicts) + "</ul>")
    if chart is not None:
        body += [f"<h2>{escape(CHART_CAPTION)}</h2>", html_image(CHART_CAPTION, chart)]
    body += ["<h2>Where BIGRec stands</h2>", "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in report.standing)
             + "</ul>", "<h2>Full tables</h2>"]
    body.append(f"<details><summary>{escape(CURVES_CAPTION)}</summary>" + html_table(*report.table)
                + (html_image(CURVES_CAPTION, curves) if curves is not None else "") + "</details>")
    for part in report.protocols:
        body.append(f"<details><summary>95% intervals and paired differences, {escape(part.title)}</summary>"
                    f'<p class="note">{escape(interval_note(report.rows))}</p>' + html_table(part.headers, part.rows)
                    + "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in part.pairs) + "</ul></details>")
    for decoding, facts in report.decodings.items():
        body += [f"<h2>Decoding: {escape(decoding)}</h2>",
                 "<ul>" + "".join(f"<li>{escape(fact)}</li>" for fact in facts) + "</ul>"]
    body += ["<details><summary>Settings</summary>" + html_table(["setting", "value"], report.settings, numeric_from=2)
             + "</details>", "<h2>Stage times</h2>",
             html_table(["stage", "seconds (0 = reused)"], [[k, f"{v:.0f}"] for k, v in report.timings.items()])]
    return body


def write_demo_report(run_dir: str | Path, report: DemoReport) -> dict[str, Path]:
    """Write the chart (``metrics/ndcg10_intervals.png``), ``report.md`` and ``report.html`` (the
    chart and, where the demo wrote it, ``metrics/side_by_side.png`` embedded). Returns their paths."""
    run_dir = Path(run_dir)
    chart = plot_intervals(report.protocols, run_dir / "metrics" / CHART, report.lead)
    curves = run_dir / "metrics" / CURVES
    markdown = run_dir / "report.md"
    io.write_text(markdown, render_markdown(report, f"metrics/{CHART}"))
    html = write_html(run_dir / "report.html", "bigrec demo report",
                      render_html(report, chart, curves if curves.is_file() else None))
    return {"chart": chart, "markdown": markdown, "html": html}
