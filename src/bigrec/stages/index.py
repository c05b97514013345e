"""``bigrec index``: embed every catalogue title with the base model into an item index file.

The index (:mod:`bigrec.grounding.index`) records the model, catalogue, precision and
grounding it was made with; evaluate, recommend and serve reuse a matching one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bigrec import io
from bigrec.config import option, to_dict
from bigrec.grounding.index import ensure_index
from bigrec.grounding.options import grounding_of, layer_option, pooling_option, title_text_option
from bigrec.llm.defaults import EMBED_BATCH_SIZE, PRECISION
from bigrec.llm.models import DEFAULT_MODEL


@dataclass
class Config:
    catalog: str = option(help="catalogue file (id2name.txt: title<TAB>id lines)")
    output: str = option(help="index file to write (safetensors)")
    base_model: str = option(DEFAULT_MODEL, "base model that embeds the titles (no adapter, as the reference)")
    precision: str = option(PRECISION, "auto (bf16 where native, else fp32), fp32, bf16 or fp16")
    batch_size: int = option(EMBED_BATCH_SIZE, "titles per forward pass")
    pooling: str = pooling_option()
    embed_layer: int = layer_option()
    title_text: str = title_text_option()
    overwrite: bool = option(False, "rebuild even if OUTPUT holds an index of another model or catalogue")


def run(config: Config) -> Path:
    output = Path(config.output)
    ensure_index(config.base_model, config.catalog, output, config.precision, batch_size=config.batch_size,
                 overwrite=config.overwrite, grounding=grounding_of(config))
    io.write_yaml(output.with_name(output.stem + ".config.yaml"), to_dict(config))
    return output
