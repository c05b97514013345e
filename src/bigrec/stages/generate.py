"""Batched generation for instruction rows (``bigrec generate``).

The decoders (free beam search, beam search constrained to the catalogue, likelihood ranking)
are in :mod:`bigrec.llm.decoders`; this stage orchestrates them. Rows are batched by prompt
length to waste little padding; finished rows go to a sidecar progress file, so an interrupted
run resumes; under ``accelerate launch`` the rows are split across processes and gathered back
in their original order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigrec import io
from bigrec.config import option, to_dict
from bigrec.data.prompts import TEMPLATES
from bigrec.io import InputError
from bigrec.llm.decoders import DECODINGS, DecodingConfig, layout_of, make_decoder
from bigrec.llm.defaults import (
    CANDIDATES,
    CF_WEIGHT,
    DECODING,
    EXCLUDE_HISTORY,
    GENERATE_BATCH_SIZE,
    GHOST_THRESHOLD,
    LENGTH_PENALTY,
    MAX_NEW_TOKENS,
    NUM_BEAMS,
    PRECISION,
    PRIOR_WEIGHT,
    SEARCH_NODES,
)
from bigrec.llm.layouts import LAYOUTS
from bigrec.llm.models import DEFAULT_MODEL, adapter_sha256, model_fingerprint, resolve_dtype

OUTPUT_FIELDS = ("predict", "predict_ids", "predict_scores", "predict_certified", "cf_ids", "cf_logp")  # what generate adds to a row (replacing old ones)

log = logging.getLogger(__name__)


@dataclass
class Config:
    test_data_path: str = option(help="instruction rows to generate for (JSON list)")
    result_json_data: str = option(help="where to write the rows with 'predict' added (JSON)")
    base_model: str = option(DEFAULT_MODEL, "base model: folder, hub id or bundled name")
    lora_weights: str | None = option(None, "LoRA adapter folder (merged into the base model)")
    batch_size: int = option(GENERATE_BATCH_SIZE, "rows per generate call (each row runs num_beams beams)", minimum=1)
    num_beams: int = option(NUM_BEAMS, "beams per row; all of them are returned", minimum=1)
    max_new_tokens: int = option(MAX_NEW_TOKENS, "upper bound on generated tokens; beams normally stop at the title's end", minimum=1)
    limit: int | None = option(None, "only the first N rows", minimum=1)
    precision: str = option(PRECISION, "auto (bf16 where native, else fp32), fp32, bf16 or fp16")
    decoding: str = option(DECODING, "free beam search (the paper's), constrained to catalogue titles, or "
                                     "likelihood: every title ranked by its log-probability", choices=list(DECODINGS))
    candidates: int = option(CANDIDATES, "likelihood: titles ranked per row, by a best-first search of the trie that "
                                         "stops once they are certain (predict_certified says where it did); metrics at "
                                         "a larger K count only these", minimum=1,
                             keyed_at_default=False)
    search_nodes: int = option(SEARCH_NODES, "likelihood: the most title tokens a row's search feeds the model; beyond it "
                                             "titles not yet reached are placed by their prefix's bound", minimum=1,
                               keyed_at_default=False)
    prior_weight: float = option(PRIOR_WEIGHT, "likelihood and constrained: subtract this times log p(title | an empty "
                                               "history) (constrained: as item scores through the trie, like --cf_scores)",
                                 keyed_at_default=False)
    catalog: str | None = option(None, "constrained: catalogue file; None: id2name.txt beside --test_data_path")
    prompt_template: str = option("alpaca", "prompt the model was trained on: alpaca (bigrec, reference BIGRec) "
                                            "or d3 (D3's code, the released BIGRec_<Category>_0.5B checkpoints)",
                                  choices=list(TEMPLATES))
    category: str | None = option(None, "d3 template: the category word of the prompt, e.g. 'video games'; "
                                        "None: each row's 'category'")
    length_penalty: float = option(LENGTH_PENALTY, "beam scores are divided by length ** length_penalty")
    length_correction: bool = option(False, "constrained: D3's length correction (near-certain tokens do not "
                                            "count towards the length)")
    ghost_threshold: float = option(GHOST_THRESHOLD, "constrained, with --length_correction: tokens of at least this "
                                                     "probability are not counted")
    cf_scores: str | None = option(None, "a `bigrec baseline` score file (scores/*.safetensors) for these rows; "
                                         "constrained: guides the search (D3's text-free assistant); likelihood: "
                                         "that model's top --candidates titles per row are scored exactly too "
                                         "(cf_ids, cf_logp), for bigrec evaluate's likelihood + SASRec ranking")
    cf_weight: float = option(CF_WEIGHT, "constrained: weight of the CF log-scores added to the beam scores")
    exclude_history: bool = option(EXCLUDE_HISTORY, "recommend something new: never return a title of the row's own history "
                                                    "(history_item_id); constrained decoding masks those titles per row, free "
                                                    "decoding drops beams that copy one and reruns a row whose every beam "
                                                    "did with 2x, then 4x the beams", keyed_at_default=False)
    layout: str = option("window", "the layout the model was trained on and the rows were prepared in (prepare "
                                   "--layout); timeline: the prompt is the history as timeline lines, a title ends "
                                   "at the line's separator", choices=list(LAYOUTS), keyed_at_default=False)
    discard_stale_progress: bool = option(False, "delete progress files left by a run with other settings instead "
                                                 "of refusing them (the demo does: its stages rerun on new settings)",
                                          changes_output=False)

    def validate(self) -> None:
        if not 0 < self.ghost_threshold <= 1:
            raise ValueError(f"--ghost_threshold must lie in (0, 1], got {self.ghost_threshold}")
        if self.cf_weight and not self.cf_scores:
            raise ValueError("--cf_weight needs --cf_scores")
        layout_of(self)  # a layout with a prompt template it does not take is an error
        if self.prior_weight < 0:
            raise ValueError(f"--prior_weight must be at least 0, got {self.prior_weight}")
        if self.decoding == "free" and self.prior_weight:
            raise ValueError("--prior_weight applies to --decoding likelihood or constrained")
        if self.prior_weight and self.cf_scores and self.decoding == "constrained":
            raise ValueError("--prior_weight and --cf_scores both guide constrained decoding; give one")
        if self.decoding == "likelihood" and (self.cf_weight or self.length_correction):
            raise ValueError("--cf_weight and --length_correction apply to --decoding constrained")
        if self.decoding == "free":
            used = [f"--{n}" for n in ("catalog", "cf_scores") if getattr(self, n)]
            used += ["--length_correction"] if self.length_correction else []
            if used:
                raise ValueError(f"{', '.join(used)} only apply to --decoding constrained")

    def catalog_path(self) -> Path:
        return Path(self.catalog) if self.catalog else Path(self.test_data_path).parent / "id2name.txt"


# --- rows and resumable progress ----------------------------------------------------------

def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    """Instruction rows from a JSON list; each needs an ``instruction`` string and an ``input``
    string holding the user's history (a prompt without one asks for no recommendation)."""
    rows = io.read_json(path)
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of instruction rows, got {type(rows).__name__}")
    if not rows:
        raise InputError(f"{path}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise InputError(f"{path}, row {i}: expected an object with an 'instruction' string")
        if not isinstance(row.get("input"), str) or not row["input"].strip():
            raise InputError(f"{path}, row {i}: no 'input' string with the user's history to recommend from")
    return rows[:limit] if limit else rows


def progress_files(result_path: str | Path) -> list[Path]:
    result_path = Path(result_path)
    return sorted(result_path.parent.glob(f"{result_path.name}.progress.*.jsonl"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_key(base_model: str) -> str:
    """The base model as a resume key: a model folder by the hash of its weights and config
    (:func:`bigrec.llm.models.model_fingerprint`), so weights rewritten at the same path do not
    resume; a bundled name (a pinned version) or a hub id by its name."""
    if Path(base_model).expanduser().is_dir():
        return "sha256:" + model_fingerprint(base_model)["sha256"]
    return base_model


def run_settings(config: Config, data_path: Path, device: str = "cpu") -> dict[str, Any]:
    """What must match for a rerun to reuse finished rows. The model and the adapter are keyed by
    their content, not their paths: an adapter retrained at the same path makes the rows of the
    old one stale."""
    settings = {"data_sha256": _sha256(data_path), "base_model": model_key(config.base_model),
                "lora_weights": "sha256:" + adapter_sha256(config.lora_weights) if config.lora_weights else None,
                "num_beams": config.num_beams,
                "max_new_tokens": config.max_new_tokens, "precision": config.precision,
                "dtype": str(resolve_dtype(config.precision, device, "decode")).removeprefix("torch."),
                "prefill_dtype": str(resolve_dtype(config.precision, device, "prefill")).removeprefix("torch."),
                "decoding": config.decoding, "prompt_template": config.prompt_template,
                "category": config.category, "length_penalty": config.length_penalty}
    if config.exclude_history:
        settings["exclude_history"] = True
    if config.layout != "window":
        settings["layout"] = config.layout
    if config.decoding != "free":
        from bigrec.data.catalog import read_catalog

        settings["catalog_sha256"] = read_catalog(config.catalog_path()).digest
    if config.decoding == "likelihood":
        settings.update(candidates=config.candidates, search_nodes=config.search_nodes,
                        prior_weight=config.prior_weight)
        if config.cf_scores:  # SASRec's candidates too; rows of a run without them are stale
            settings["cf_scores_sha256"] = _sha256(Path(config.cf_scores))
    if config.decoding == "constrained":
        settings.update(length_correction=config.length_correction, ghost_threshold=config.ghost_threshold,
                        cf_scores_sha256=_sha256(Path(config.cf_scores)) if config.cf_scores else None,
                        cf_weight=config.cf_weight)
        if config.prior_weight:
            settings["prior_weight"] = config.prior_weight
    return settings


# Settings a progress file may not record: the value such a file stands for.
_UNRECORDED_SETTINGS = {"decoding": "free", "prompt_template": "alpaca", "category": None, "length_penalty": 1.0,
                    "dtype": "float32", "prefill_dtype": "float32"}


def read_progress(result_path: str | Path, settings: dict[str, Any],
                  stale: list[Path] | None = None) -> dict[int, dict[str, Any]]:
    """Finished rows from every progress file, by row position: ``{"predict": [...], ...}`` each
    (constrained rows also hold ``predict_ids`` and ``predict_scores``). A file of other settings
    is an error, or, given a ``stale`` list, is added to it and its rows are left out."""
    done: dict[int, dict[str, Any]] = {}
    for path in progress_files(result_path):
        rows = _progress_rows(path, settings, stale is not None)
        if rows is None:
            stale.append(path)
        else:
            done.update(rows)
    return done


def _progress_rows(path: Path, settings: dict[str, Any], tolerate: bool) -> dict[int, dict[str, Any]] | None:
    """One progress file's rows; None for a file of other settings when ``tolerate``."""
    done: dict[int, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):  # a write cut short by a kill: that row reruns
                break
            raise InputError(f"{path}, line {lineno}: not valid JSON; delete the file to start afresh") from None
        if "settings" in record:
            recorded = {**_UNRECORDED_SETTINGS, **record["settings"]}
            if recorded != settings:
                if tolerate:
                    return None
                changed = sorted(k for k in {*settings, *recorded} if recorded.get(k) != settings.get(k))
                raise InputError(f"{path}: left by a run with other settings ({', '.join(changed)}); "
                                 "delete it to start afresh")
            continue
        done[int(record.pop("pos"))] = record
    return done


class ProgressWriter:
    """Appends finished rows (one JSON line each) to this process's progress file, durably."""

    def __init__(self, result_path: str | Path, rank: int, settings: dict[str, Any]):
        self.path = Path(f"{result_path}.progress.{rank}.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self.handle = self.path.open("a", encoding="utf-8")
        if fresh:
            self._write([{"settings": settings}])

    def _write(self, records: list[dict]) -> None:
        self.handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, positions: list[int], outputs: list[dict[str, Any]]) -> None:
        """One record per row: its position and its output fields (``predict``, ...)."""
        self._write([{"pos": p, **out} for p, out in zip(positions, outputs, strict=True)])

    def close(self) -> None:
        self.handle.close()


# --- the stage ------------------------------------------------------------------------------

def run(config: Config) -> Path:
    """Generate for every row not yet finished, then write the full result file atomically."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from bigrec.llm.models import load_model

    state = PartialState()
    data_path = Path(config.test_data_path)
    result_path = Path(config.result_json_data)
    rows = read_rows(data_path, config.limit)
    settings = run_settings(config, data_path, str(state.device))
    stale: list[Path] | None = [] if config.discard_stale_progress else None
    done = read_progress(result_path, settings, stale)
    todo = [pos for pos in range(len(rows)) if pos not in done]
    if done and state.is_main_process:
        log.info("resuming: %d of %d rows already finished in %s", len(rows) - len(todo), len(rows),
                 ", ".join(str(p) for p in progress_files(result_path)))
    state.wait_for_everyone()  # every process has read the progress files before any appends
    if stale and state.is_main_process:
        for path in stale:
            log.warning("%s: left by a run with other settings; deleted", path)
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    produced: list[tuple[int, dict[str, Any]]] = []
    if todo:
        layout = layout_of(config)
        prompts = {pos: layout.prompt(rows[pos]) for pos in todo}  # bad template settings fail before the model loads
        # Likelihood ranking has no decode steps: its weights take the prefill's dtype (bf16 where native),
        # rather than an autocast that casts every weight again on every forward.
        model, tokenizer = load_model(config.base_model, config.precision, config.lora_weights, device=str(state.device),
                                      phase="prefill" if config.decoding == "likelihood" else "decode")
        prefill_dtype = resolve_dtype(config.precision, state.device, "prefill")
        cf = None
        if config.decoding != "free" and config.cf_scores:
            from bigrec.evaluation.scores import load_scores

            cf = load_scores(config.cf_scores)
        decoder = make_decoder(DecodingConfig.of(config), model, tokenizer, prefill_dtype, cf)
        lengths = {pos: len(ids) for pos, ids in zip(todo, tokenizer([prompts[p] for p in todo])["input_ids"],
                                                      strict=True)}
        todo.sort(key=lambda pos: (-lengths[pos], pos))  # long prompts first: little padding per batch
        with state.split_between_processes(todo) as mine:
            writer = ProgressWriter(result_path, state.process_index, settings)
            bar = tqdm(total=len(mine), unit="row", desc="generate", disable=not state.is_local_main_process)
            start = time.perf_counter()
            try:
                for lo in range(0, len(mine), config.batch_size):
                    batch = mine[lo:lo + config.batch_size]
                    outputs = decoder([rows[p] for p in batch], [prompts[p] for p in batch])
                    writer.add(batch, outputs)
                    produced.extend(zip(batch, outputs, strict=True))
                    bar.update(len(batch))
            finally:
                writer.close()
                bar.close()
            elapsed = time.perf_counter() - start
            log.info("process %d: %d rows in %.1fs (%.2f rows/s)", state.process_index, len(mine), elapsed,
                     len(mine) / elapsed if elapsed else float("nan"))
            summary = decoder.summary()
            if summary:
                log.info("process %d: %s", state.process_index, summary)
    for pos, output in gather_object(produced):
        done[pos] = output
    if state.is_main_process:
        missing = [pos for pos in range(len(rows)) if pos not in done]
        if missing:
            raise RuntimeError(f"rows {missing[:10]} were not generated; rerun to finish them")
        results = [{**{k: v for k, v in row.items() if k not in OUTPUT_FIELDS}, **done[pos]}
                   for pos, row in enumerate(rows)]
        io.write_json(result_path, results)
        io.write_yaml(result_path.with_name(result_path.stem + ".config.yaml"), to_dict(config))
        for path in progress_files(result_path):
            path.unlink()
        log.info("wrote %d rows to %s", len(results), result_path)
    state.wait_for_everyone()
    return result_path
