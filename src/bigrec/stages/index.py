"""Item embedding index (``bigrec index``): every catalogue title embedded by the base model.

Grounding compares a generation's embedding with these, so both must come from the same
model, in the same way (a :class:`Grounding`) and at the same precision. The reference
notebook's way is the default: bare title text, left padding, last layer's hidden state at
the last token. The file records the model's fingerprint, the catalogue hash, dtype and the
grounding; :func:`ensure_index` reuses a matching index and refuses any other.

File: safetensors with tensor ``embeddings`` [N, D] float32, row i = catalogue id i, and
string metadata ``format``, ``model_fingerprint`` (JSON), ``catalog_hash``, ``catalog``,
``num_items``, ``dtype``, ``pooling``, ``layer``, ``text``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bigrec import io
from bigrec.config import option, to_dict
from bigrec.data.catalog import Catalog, read_catalog
from bigrec.data.prompts import natural_title
from bigrec.llm.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

FORMAT = "bigrec-index/1"
POOLINGS = ("last", "mean")
TITLE_TEXTS = ("bare", "natural")


class IndexMismatchError(ValueError):
    """An index file made by another model, for another catalogue, or at another precision."""


@dataclass(frozen=True)
class Grounding:
    """How a title (catalogue item or generation) becomes a vector; both sides must agree.

    ``pooling``: ``last`` = the hidden state at the last token (the reference), ``mean`` = the
    mean over the title's tokens. ``layer``: which hidden state, -1 = the last layer (after the
    final norm), 1..L = after that many transformer layers. ``text``: ``bare`` embeds the title
    as written, ``natural`` first puts a trailing article back in front (see
    :func:`bigrec.data.prompts.natural_title`).

    Measured on the demo's generations (``benchmarks/bench_grounding.py``): the reference's
    last-token state mostly encodes the last tokens (the year), so near-miss generations land on
    unrelated items; the mean over tokens of natural titles grounds them far better.
    """

    pooling: str = "last"
    layer: int = -1
    text: str = "bare"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.text not in TITLE_TEXTS:
            raise ValueError(f"title text must be one of {', '.join(TITLE_TEXTS)}, got {self.text!r}")
        if self.layer == 0 or self.layer < -1:
            raise ValueError(f"layer must be -1 (the last) or a layer number from 1, got {self.layer}")

    def meta(self) -> dict[str, str]:
        return {"pooling": self.pooling, "layer": str(self.layer), "text": self.text}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Grounding | None:
        try:
            return cls(meta["pooling"], int(meta["layer"]), meta["text"])
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        where = "last layer" if self.layer == -1 else f"layer {self.layer}"
        how = "last token" if self.pooling == "last" else "mean over tokens"
        return f"{where}, {how}, {self.text} titles"

    def texts(self, titles: list[str]) -> list[str]:
        return [natural_title(t) for t in titles] if self.text == "natural" else list(titles)


REFERENCE = Grounding()


# The same three options on every stage that embeds (index, evaluate, demo); defaults: the reference.
def pooling_option(default: str = REFERENCE.pooling):
    return option(default, "last: hidden state at the last token (reference); mean: mean over tokens",
                  choices=POOLINGS)


def layer_option(default: int = REFERENCE.layer):
    return option(default, "hidden state to embed with: -1 = last layer (reference), N = after N layers")


def title_text_option(default: str = REFERENCE.text):
    return option(default, "bare: titles as written (reference); natural: 'Shining, The (1980)' embedded as "
                           "'The Shining (1980)'", choices=TITLE_TEXTS)


@dataclass
class Config:
    catalog: str = option(help="catalogue file (id2name.txt: title<TAB>id lines)")
    output: str = option(help="index file to write (safetensors)")
    base_model: str = option(DEFAULT_MODEL, "base model that embeds the titles (no adapter, as the reference)")
    precision: str = option("auto", "auto (bf16 where native, else fp32), fp32, bf16 or fp16")
    batch_size: int = option(64, "titles per forward pass")
    pooling: str = pooling_option()
    embed_layer: int = layer_option()
    title_text: str = title_text_option()
    overwrite: bool = option(False, "rebuild even if OUTPUT holds an index of another model or catalogue")


def grounding_of(config) -> Grounding:
    """The :class:`Grounding` that a stage's ``pooling``/``embed_layer``/``title_text`` options name."""
    return Grounding(config.pooling, config.embed_layer, config.title_text)


def grounding_options(grounding: Grounding) -> dict[str, Any]:
    """The options that name ``grounding``, to pass on to another stage's config (inverse of :func:`grounding_of`)."""
    return {"pooling": grounding.pooling, "embed_layer": grounding.layer, "title_text": grounding.text}


def embed_texts(model, tokenizer, texts: list[str], batch_size: int = 64,
                grounding: Grounding = REFERENCE) -> torch.Tensor:
    """One vector per text, as ``grounding`` says -> [len(texts), D] float32.

    Left padding puts every text's last token in the last column; position ids count from
    each text's first real token, so an embedding does not depend on its batch neighbours.
    Texts are batched by length to waste little padding.
    """
    body = model.base_model  # the transformer without the LM head: no [B, T, vocab] logits
    layers = model.config.num_hidden_layers
    if grounding.layer > layers:
        raise ValueError(f"embedding layer {grounding.layer} does not exist: the model has {layers} layers")
    texts = grounding.texts(texts)
    hidden_states = grounding.layer != -1
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            picks = order[lo:lo + batch_size]
            enc = tokenizer([texts[i] for i in picks], return_tensors="pt", padding=True)
            if enc["input_ids"].shape[1] == 0:  # nothing to embed: only empty texts without BOS
                raise ValueError("cannot embed an empty text with a tokenizer that adds no BOS token")
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            result = body(input_ids=enc["input_ids"].to(model.device), attention_mask=mask.to(model.device),
                          position_ids=positions.to(model.device), output_hidden_states=hidden_states)
            states = result.hidden_states[grounding.layer] if hidden_states else result.last_hidden_state
            if grounding.pooling == "last":
                hidden = states[:, -1, :]  # [B, D]
            else:
                weights = mask.to(states.device, states.dtype).unsqueeze(-1)  # [B, T, 1]
                hidden = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
            if out is None:
                out = torch.empty(len(texts), hidden.shape[-1], dtype=torch.float32)
            out[torch.tensor(picks)] = hidden.float().cpu()
    if out is None:
        raise ValueError("no texts to embed")
    return out


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """What identifies a model: the hash of its files, or its name where there are no files."""
    return fingerprint.get("sha256") or f"name:{fingerprint.get('name_or_path') or fingerprint.get('base_model')}"


def save_index(path: str | Path, embeddings: torch.Tensor, fingerprint: dict, catalog: Catalog,
               dtype: torch.dtype, grounding: Grounding = REFERENCE) -> Path:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "model_fingerprint": json.dumps(fingerprint, sort_keys=True),
            "catalog_hash": catalog.digest, "catalog": str(catalog.path), "num_items": str(len(catalog)),
            "dtype": str(dtype).removeprefix("torch."), **grounding.meta()}
    with io.atomic_path(path) as tmp:
        save_file({"embeddings": embeddings.float().contiguous()}, str(tmp), metadata=meta)
    return Path(path)


def load_index(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Embeddings [N, D] and the metadata of an index file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != FORMAT or "embeddings" not in set(handle.keys()):
                raise IndexMismatchError(f"{path}: not a bigrec item index (format {meta.get('format')!r})")
            embeddings = handle.get_tensor("embeddings")
    except SafetensorError as exc:
        raise IndexMismatchError(f"{path}: not a readable safetensors index: {exc}") from exc
    return embeddings, meta


def check_index(path: str | Path, meta: dict[str, str], embeddings: torch.Tensor, fingerprint: dict,
                catalog: Catalog, dtype: torch.dtype, grounding: Grounding = REFERENCE) -> None:
    """Refuse an index that another model, catalogue or precision produced."""
    theirs = json.loads(meta.get("model_fingerprint", "{}"))
    if fingerprint_key(theirs) != fingerprint_key(fingerprint):
        raise IndexMismatchError(
            f"{path}: made by another base model ({theirs.get('base_model')!r}, sha256 "
            f"{str(theirs.get('sha256'))[:12]}) than {fingerprint.get('base_model')!r} (sha256 "
            f"{str(fingerprint.get('sha256'))[:12]}); rebuild it with `bigrec index --overwrite` or use another path")
    if meta.get("catalog_hash") != catalog.digest or embeddings.shape[0] != len(catalog):
        raise IndexMismatchError(f"{path}: made for another catalogue ({meta.get('catalog')}, "
                                 f"{meta.get('num_items')} items) than {catalog.path} ({len(catalog)} items)")
    want = str(dtype).removeprefix("torch.")
    if meta.get("dtype") != want:
        raise IndexMismatchError(f"{path}: embedded in {meta.get('dtype')}, but this run uses {want}; "
                                 f"pass --precision {meta.get('dtype')} or rebuild the index")
    theirs_grounding = Grounding.from_meta(meta)
    if theirs_grounding != grounding:
        made = theirs_grounding.describe() if theirs_grounding else f"an older format (pooling {meta.get('pooling')!r})"
        raise IndexMismatchError(f"{path}: embedded with {made}, but this run grounds with {grounding.describe()}; "
                                 "rebuild it with `bigrec index --overwrite` or use another path")


def ensure_index(base_model: str, catalog_path: str | Path, cache_path: str | Path, precision: str = "auto",
                 *, model=None, tokenizer=None, batch_size: int = 64, overwrite: bool = False,
                 grounding: Grounding = REFERENCE) -> torch.Tensor:
    """Item embeddings [N, D]: a matching index at ``cache_path`` is reused, else built and saved.

    ``model``/``tokenizer`` may be passed when the caller has loaded the base model already.
    """
    from bigrec.llm.models import load_model, model_fingerprint, resolve_dtype

    catalog = read_catalog(catalog_path)
    fingerprint = model_fingerprint(base_model)
    dtype = model.dtype if model is not None else resolve_dtype(precision)
    cache_path = Path(cache_path)
    if cache_path.exists() and not overwrite:
        embeddings, meta = load_index(cache_path)
        check_index(cache_path, meta, embeddings, fingerprint, catalog, dtype, grounding)
        log.info("reusing item index %s (%d items, %s, %s)", cache_path, len(catalog), meta["dtype"],
                 grounding.describe())
        return embeddings
    if model is None:
        model, tokenizer = load_model(base_model, precision)
    start = time.perf_counter()
    embeddings = embed_texts(model, tokenizer, catalog.titles, batch_size, grounding)
    log.info("embedded %d titles in %.1fs (%s)", len(catalog), time.perf_counter() - start, grounding.describe())
    save_index(cache_path, embeddings, fingerprint, catalog, model.dtype, grounding)
    log.info("wrote item index %s", cache_path)
    return embeddings


def run(config: Config) -> Path:
    output = Path(config.output)
    ensure_index(config.base_model, config.catalog, output, config.precision, batch_size=config.batch_size,
                 overwrite=config.overwrite, grounding=grounding_of(config))
    io.write_yaml(output.with_name(output.stem + ".config.yaml"), to_dict(config))
    return output
