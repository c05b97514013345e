"""``bigrec package``: a ``bigrec train`` output folder and its prepared data -> a run folder to serve.

``bigrec recommend`` and ``bigrec serve`` load a run folder described by ``run.yaml``
(:class:`bigrec.app.run_manifest.RunManifest`); ``bigrec demo`` writes one, and this stage writes
one for any model ``bigrec train`` made: a LoRA adapter (served on the base model it was trained
on) or a full fine-tune (``--lora false``: the output folder is itself the model), in either
layout. Everything the served prompts depend on comes from the records the two stages left,
never from flags: the base model, the layout, LoRA or full and the precision from the train
folder's ``config.yaml``; the prompts' wording (``domain_wording``), the title form
(``prompt_titles``) and the history length from the data folder's (see
:func:`bigrec.app.run_manifest.prepared_domain`). So a served prompt is the prompt the model was
trained and evaluated with, byte for byte.

The run folder references the model, the adapter and the data by paths relative to itself (it
copies nothing; move the folders together) and holds the item index (built by
:mod:`bigrec.stages.index` unless a matching one is there) and ``run.yaml``. It is staged and
swapped in whole, so a failed run leaves no half-written folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bigrec.app.run_manifest import (
    MANIFEST,
    RunManifest,
    domain_value,
    prepared_domain,
)
from bigrec.config import ConfigError, check_output_dir, option, to_dict
from bigrec.grounding.options import (
    grounding_of,
    grounding_options,
    layer_option,
    pooling_option,
    title_text_option,
)
from bigrec.io import InputError, read_yaml_mapping, staged_dir, write_yaml
from bigrec.llm.defaults import (
    DECODING,
    DECODINGS,
    EXCLUDE_HISTORY,
    MAX_NEW_TOKENS,
    NUM_BEAMS,
    PRECISION,
    PRIOR_WEIGHT,
    SEARCH_NODES,
)

log = logging.getLogger(__name__)

INDEX = "index.safetensors"
FINISHED = ("done", "paused")  # train statuses whose output folder holds a saved model


@dataclass
class Config:
    train_dir: str = option(help="a `bigrec train` output folder (its config.yaml, and the adapter or the model)")
    data: str = option(help="the `bigrec prepare` folder the model was trained on (id2name.txt, config.yaml, splits)")
    out: str = option(help="the run folder to write (replaced whole; an existing folder must be a run folder)")
    base_model: str | None = option(None, "LoRA: the base model, where the path the train record names is gone "
                                          "(checked against the recorded weights' hash)")
    decoding: str = option(DECODING, "free: beam search, then every item by L2 distance (the paper's); constrained: "
                                     "beam search over the catalogue's titles, the rest by L2 distance; likelihood: "
                                     "every title by its log-probability given the history", choices=list(DECODINGS))
    num_beams: int = option(NUM_BEAMS, "free and constrained: beams per request", minimum=1)
    max_new_tokens: int = option(MAX_NEW_TOKENS, "free: most generated tokens", minimum=1)
    search_nodes: int = option(SEARCH_NODES, "likelihood: the most title tokens a history's search feeds the model "
                                             "(as bigrec generate --search_nodes)", minimum=1)
    prior_weight: float = option(PRIOR_WEIGHT, "likelihood: minus this times log p(title | an empty history)", minimum=0)
    exclude_history: bool = option(EXCLUDE_HISTORY, "leave the history's titles out unless a request says otherwise")
    precision: str | None = option(None, "auto, fp32, bf16 or fp16 (default: the one the model was trained in)",
                                   choices=["auto", "fp32", "bf16", "fp16"])
    sasrec: str | None = option(None, "a `bigrec baseline --model sasrec` folder on the same data, for the page's "
                                      "side-by-side lists")
    pooling: str = pooling_option()
    embed_layer: int = layer_option()
    title_text: str = title_text_option()

    def validate(self) -> None:
        check_output_dir(self.out, "out")


def _record(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    return read_yaml_mapping(path)


def _relative(target: Path, run_dir: Path) -> str:
    """``target`` as run.yaml names it: relative to the run folder."""
    return os.path.relpath(target.resolve(), run_dir.resolve())


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@dataclass
class Trained:
    """What a train output folder's config.yaml says about the model it holds."""

    lora: bool
    layout: str
    precision: str
    base_model: str  # as run.yaml names it: a bundled name, a hub id, or a folder (absolute here)
    summary: str
    train_data: list[str]  # config.train_data_path, as given to bigrec train


def read_train(train_dir: Path, base_override: str | None) -> Trained:
    from bigrec.llm.models import ModelNotFoundError, model_fingerprint, resolve_base_model

    path = train_dir / "config.yaml"
    record = _record(path)
    if record.get("stage") != "train" or not isinstance(record.get("config"), dict):
        raise InputError(f"{path}: not a `bigrec train` record (no 'stage: train' with its 'config')")
    if record.get("status") not in FINISHED:
        raise InputError(f"{path}: status {record.get('status')!r}: training has not finished; its folder holds no "
                         "model to serve yet")
    config = record["config"]
    for key, kind in (("lora", bool), ("base_model", str)):
        if not isinstance(config.get(key), kind):
            raise InputError(f"{path}: config.{key} is missing or not a {kind.__name__}")
    layout, precision = config.get("layout", "window"), config.get("precision", PRECISION)
    if config["lora"]:
        if not (train_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{train_dir}/adapter_config.json: not found, though {path} says config.lora: true")
        recorded = record.get("base_model") if isinstance(record.get("base_model"), dict) else {}
        candidates = [base_override] if base_override else [config["base_model"], recorded.get("resolved")]
        base = None
        for name in filter(None, candidates):
            if Path(name).expanduser().is_dir():  # a model folder, named by its absolute path until run.yaml
                base = str(Path(name).expanduser().resolve())
                break
            try:
                resolve_base_model(name)  # a bundled name or a hub id stays a name
            except ModelNotFoundError:
                continue
            base = name
            break
        if base is None:
            raise FileNotFoundError(f"{path}: config.base_model {config['base_model']!r} is not found from here; "
                                    "pass --base_model")
        theirs, ours = recorded.get("sha256"), model_fingerprint(base).get("sha256")
        if theirs and ours and theirs != ours:
            raise InputError(f"{path}: base_model.sha256 {theirs[:12]} is not the hash of {base} ({ours[:12]}): "
                             "the adapter was trained on other weights")
        how = f"LoRA adapter on {config['base_model']}"
    else:
        if not (train_dir / "config.json").is_file():
            raise FileNotFoundError(f"{train_dir}/config.json: not found, though {path} says config.lora: false")
        base = str(train_dir.resolve())
        how = f"full fine-tune of {config['base_model']}"
    return Trained(config["lora"], layout, precision, base, f"{how}, {layout} layout",
                   [str(p) for p in config.get("train_data_path") or []])


def run(config: Config) -> Path:
    from bigrec.grounding.index import IndexMismatchError
    from bigrec.stages import index as index_stage

    train_dir, data, out = Path(config.train_dir), Path(config.data), Path(config.out)
    trained = read_train(train_dir, config.base_model)
    record = _record(data / "config.yaml")
    if record.get("stage") != "prepare":
        raise InputError(f"{data / 'config.yaml'}: not a `bigrec prepare` record (no 'stage: prepare')")
    prepared_layout = record.get("layout", "window")
    if prepared_layout != trained.layout:
        raise InputError(f"{train_dir / 'config.yaml'}: config.layout {trained.layout!r}, but {data / 'config.yaml'} "
                         f"prepared the rows in layout {prepared_layout!r}")
    catalog = data / "id2name.txt"
    if not catalog.is_file():
        raise FileNotFoundError(f"{catalog}: not found; give the folder bigrec prepare wrote")
    domain = prepared_domain(data)
    trained_on = [Path(p) for p in trained.train_data]
    if trained_on and all(p.is_file() for p in trained_on) and not any(_inside(p, data) for p in trained_on):
        log.warning("%s: trained on %s, which is not in --data %s; the served catalogue and prompts are %s's",
                    train_dir / "config.yaml", ", ".join(map(str, trained_on)), data, data)
    for name, folder in (("--train_dir", train_dir), ("--data", data), ("--base_model", Path(trained.base_model)),
                         ("--sasrec", Path(config.sasrec) if config.sasrec else None)):
        if folder is not None and folder.exists() and _inside(folder, out):
            raise ConfigError(f"--out: {out} holds {name} {folder}; writing the run folder would replace it")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ConfigError(f"--out: {out} exists and is not a run folder (no {MANIFEST}); choose another folder")
    if config.sasrec and not (Path(config.sasrec) / "model.json").is_file():
        raise FileNotFoundError(f"{Path(config.sasrec) / 'model.json'}: not found; --sasrec takes a bigrec baseline "
                                "--model sasrec output folder")
    precision = config.precision or trained.precision
    base_dir = Path(trained.base_model)
    with staged_dir(out, whole=True) as stage:
        # paths relative to the final folder, which the stage becomes (a sibling: the same depth)
        if (out / INDEX).is_file():  # a matching index of an earlier packaging is reused
            shutil.copy2(out / INDEX, stage / INDEX)
        index_cfg = index_stage.Config(catalog=str(catalog), output=str(stage / INDEX), base_model=trained.base_model,
                                       precision=precision, **grounding_options(grounding_of(config)))
        try:
            index_stage.run(index_cfg)
        except IndexMismatchError:
            index_cfg.overwrite = True
            index_stage.run(index_cfg)
        # the index's record names where the index ends up, not the staging folder
        write_yaml(stage / "index.config.yaml", {**to_dict(index_cfg), "output": str(out / INDEX)})
        manifest = RunManifest(
            base_model=_relative(base_dir, out) if base_dir.is_dir() else trained.base_model,
            adapter=_relative(train_dir, out) if trained.lora else None,
            catalog=_relative(catalog, out), index=INDEX, data=_relative(data, out),
            sasrec=_relative(Path(config.sasrec), out) if config.sasrec else None,
            domain=domain_value(domain), prompt_titles=record.get("prompt_titles", "catalogue"),
            layout=trained.layout, precision=precision, **grounding_options(grounding_of(config)),
            num_beams=config.num_beams, max_new_tokens=config.max_new_tokens, decoding=config.decoding,
            prior_weight=config.prior_weight, search_nodes=config.search_nodes,
            exclude_history=config.exclude_history,
            ranking_note=f"{config.decoding} decoding as packaged (bigrec package), not chosen on validation; "
                         f"{trained.summary}")
        manifest.save(stage)
        write_yaml(stage / "package.config.yaml", {"stage": "package", **to_dict(config)})
    log.info("wrote run folder %s: %s, %s decoding, prompts worded for %s", out, trained.summary, config.decoding,
             domain.plural)
    return out
