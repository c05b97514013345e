"""The item index: every catalogue title embedded once, saved, and reused only where it matches.

File: safetensors with tensor ``embeddings`` [N, D] float32, row i = catalogue id i, and
string metadata ``format``, ``model_fingerprint`` (JSON), ``catalog_hash``, ``catalog``,
``num_items``, ``dtype``, ``pooling``, ``layer``, ``text``. :func:`ensure_index` reuses an
index made by the same model, for the same catalogue, at the same precision and grounding, and
refuses any other.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bigrec import io
from bigrec.data.catalog import Catalog, read_catalog
from bigrec.grounding.embedding import REFERENCE, Grounding, embed_texts
from bigrec.llm.defaults import EMBED_BATCH_SIZE, PRECISION

log = logging.getLogger(__name__)


FORMAT = "bigrec-index/1"



class IndexMismatchError(io.InputError):
    """An index file made by another model, for another catalogue, or at another precision: the file
    given is not this run's (an input error, one line)."""



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



def ensure_index(base_model: str, catalog_path: str | Path, cache_path: str | Path, precision: str = PRECISION,
                 *, model=None, tokenizer=None, batch_size: int = EMBED_BATCH_SIZE, overwrite: bool = False,
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
