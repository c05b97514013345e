"""Result files of ``bigrec generate`` read for evaluation: rows, targets, beams, histories, diagnostics.

Each row needs a non-empty ``predict`` list of strings and a target in the catalogue (rows whose
target is not in it are counted and left out). ``predict_ids`` (constrained decoding) and
``history_item_id`` (rows of ``bigrec prepare``) are checked where present.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bigrec import io
from bigrec.config import ConfigError
from bigrec.data.catalog import Catalog, UnknownTargetError, row_target
from bigrec.data.prompts import normalize_title, title_forms
from bigrec.evaluation.metrics import seen_mask, target_id_lists
from bigrec.io import InputError

log = logging.getLogger(__name__)


MAX_PREDICTION_CHARS = 1000  # a generation is embedded up to here; longer ones ran on past any title



@dataclass
class Results:
    """One result file: its rows, their targets, and each row's generations (normalised titles)."""

    path: Path
    rows: list[dict]
    targets: list[list[int]]  # per row, every catalogue id with the target's title
    beams: list[list[str]]
    first: list[list[int]] | None = None  # per row, its beams' item ids in beam order ([] without predict_ids)
    has_ids: list[bool] | None = None  # per row: did it carry predict_ids
    unknown_targets: list[str] | None = None  # skipped rows whose target title is not in the catalogue
    histories: list[list[int]] | None = None  # per row, its history's item ids (None: a row lacks them)

    @property
    def decoding(self) -> str:
        """constrained (every row has predict_ids), free (none has) or mixed."""
        ids = sum(self.has_ids or [])
        return "constrained" if ids == len(self.rows) else "free" if ids == 0 else "mixed"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def top1(self) -> list[str]:
        return [b[0] for b in self.beams]



def result_files(spec: str | Path, exclude: set[Path] = frozenset()) -> list[Path]:
    spec = Path(spec)
    if spec.is_file():
        return [spec]
    if not spec.is_dir():
        raise FileNotFoundError(f"results not found: {spec}")
    skip = {p.resolve() for p in exclude}
    files = sorted(p for p in spec.glob("*.json") if p.resolve() not in skip)
    if not files:
        raise FileNotFoundError(f"{spec}: no result files (*.json)")
    return files



def read_results(path: Path, catalog: Catalog) -> Results:
    """Rows with a non-empty ``predict`` list of strings and a target in the catalogue."""
    rows = io.read_json(path)
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of result rows, got {type(rows).__name__}")
    if not rows:
        raise InputError(f"{path}: no result rows")
    targets, beams, first, has_ids, kept, unknown, histories = [], [], [], [], [], [], []
    cut = 0
    for i, row in enumerate(rows):
        where = f"{path}, row {i}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object")
        predict = row.get("predict")
        if predict is None:
            raise InputError(f"{where}: no 'predict' field; run bigrec generate on this file first")
        if not isinstance(predict, list) or not predict or not all(isinstance(p, str) for p in predict):
            raise InputError(f"{where}: field 'predict' must be a non-empty list of strings, got {predict!r}")
        try:
            targets.append(row_target(row, catalog, where))
        except UnknownTargetError as exc:
            unknown.append(str(exc))
            continue
        kept.append(row)
        histories.append(_history_ids(row.get("history_item_id"), len(catalog), where))
        beams.append([normalize_title(p[:MAX_PREDICTION_CHARS * 2])[:MAX_PREDICTION_CHARS] for p in predict])
        cut += any(len(p) > MAX_PREDICTION_CHARS for p in predict)
        ids = row.get("predict_ids")
        has_ids.append(ids is not None)
        first.append([] if ids is None else _beam_ids(ids, len(predict), len(catalog), where))
    if cut:
        log.warning("%s: %d rows hold a generation longer than %d characters; cut there (no title is that long)",
                    path, cut, MAX_PREDICTION_CHARS)
    if unknown:
        log.warning("%s: %d of %d rows have a target that is not in the catalogue and are left out of the "
                    "metrics; first: %s", path, len(unknown), len(rows), unknown[0])
    if not kept:
        raise InputError(f"{path}: no row has a target in {catalog.path} ({unknown[0]})")
    return Results(path, kept, target_id_lists(targets, catalog.titles), beams, first, has_ids, unknown,
                   None if any(h is None for h in histories) else histories)



def row_targets(rows: list[dict], catalog: Catalog, where: str) -> list[list[int]]:
    """Per instruction row, every catalogue id with its target's title (what ranks are counted on)."""
    return target_id_lists([row_target(r, catalog, where) for r in rows], catalog.titles)


def history_mask(histories: list[list[int]], targets: list[list[int]], catalog: Catalog):
    """The seen-items mask [R, N] that leaving each row's history out ranks under: every id sharing a
    title with a history item (:meth:`Catalog.history_titles`, what the decoders and the service
    leave out too), never a target id. One rule for ``evaluate --exclude_history`` and the demo."""
    return seen_mask([catalog.history_titles(h) for h in histories], targets, len(catalog))


def _history_ids(ids: object, num_items: int, where: str) -> list[int] | None:
    """A row's ``history_item_id`` (None when the row has none, as reference-format files)."""
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_items
                                            for i in ids):
        raise InputError(f"{where}: field 'history_item_id' must be a list of catalogue ids (0..{num_items - 1}), "
                         f"got {ids!r}")
    return ids



def need_histories(results: Results, why: str) -> list[list[int]]:
    if results.histories is None:
        raise InputError(f"{results.path}: {why} needs 'history_item_id' on every row (rows of bigrec prepare "
                         "carry it)")
    return results.histories



def _beam_ids(ids: object, beams: int, num_items: int, where: str) -> list[int]:
    """A row's ``predict_ids`` (a list of id lists, one per beam), flattened in beam order."""
    if not isinstance(ids, list) or len(ids) != beams or not all(
            isinstance(b, list) and b and all(isinstance(i, int) and not isinstance(i, bool) for i in b) for b in ids):
        raise InputError(f"{where}: field 'predict_ids' must be a list of {beams} non-empty lists of item ids "
                         "(one per 'predict' beam)")
    flat = [i for b in ids for i in b]
    if not all(0 <= i < num_items for i in flat):
        raise InputError(f"{where}: 'predict_ids' {ids!r} holds ids outside the catalogue (0..{num_items - 1})")
    return flat



def history_copy_share(results: Results, catalog: Catalog) -> float | None:
    """Share of rows whose top generation is a title from the row's own history (as written in the
    catalogue or with its article in front). A model can look useful by echoing the history and
    letting grounding find titles near it; this says how often it does. None without histories."""
    if results.histories is None:
        return None
    copies = 0
    for top, history in zip(results.top1, results.histories, strict=True):
        copies += bool(top) and top in {form for i in history for form in title_forms(catalog.titles[i])}
    return copies / len(results.top1)



def diagnostics(results: Results, catalog: Catalog) -> dict:
    """How varied and how grounded the top generations are (homogeneity shows here first)."""
    top = results.top1
    counts = Counter(top)
    n = len(top)
    return {"rows": n, "decoding": results.decoding, "empty_top1": sum(1 for t in top if not t),
            "history_copy_top1_share": history_copy_share(results, catalog),
            "unknown_targets_skipped": len(results.unknown_targets or []),
            "distinct_top1_share": len([t for t in counts if t]) / n,
            "exact_title_top1_share": sum(c for t, c in counts.items() if t and catalog.is_title(t)) / n,
            "most_frequent_top1": [[t, c] for t, c in counts.most_common(10)],
            "certified_top10_share": certified_share(results.rows)}


def certified_share(rows: list[dict], k: int = 10) -> float | None:
    """The share of likelihood-ranked rows whose first ``k`` places are provably exact
    (``predict_certified``; elsewhere the search ran out of its budget); None for other decodings."""
    certified = [(r.get("predict_certified"), len(r.get("predict") or ())) for r in rows]
    if not rows or any(c is None for c, _ in certified):
        return None
    return sum(c >= min(k, n) for c, n in certified) / len(rows)



def pair_valid(test: Results, valid: list[Results]) -> Results:
    same = [v for v in valid if v.name == test.name]
    if same:
        return same[0]
    if len(valid) == 1:
        return valid[0]
    raise ConfigError(f"no validation results for {test.path}: expected {test.name} among "
                      f"{', '.join(v.name for v in valid)}")
