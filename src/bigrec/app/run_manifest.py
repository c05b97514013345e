"""``run.yaml``: what a finished run folder holds, so recommend/serve rebuild everything from it.

Paths in the manifest are relative to the run folder, so a run folder can be moved or copied
to another machine as a whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from bigrec.io import write_yaml

MANIFEST = "run.yaml"


@dataclass
class RunManifest:
    base_model: str  # as given to --base_model (folder, hub id or bundled name)
    catalog: str = "data/id2name.txt"  # the catalogue the index was built from
    index: str = "index.safetensors"  # item embeddings (bigrec.stages.index)
    data: str | None = "data"  # prepared dataset folder, for --user lookups and popularity
    adapter: str | None = "adapter"  # LoRA adapter folder; None = the base model alone
    sasrec: str | None = "sasrec"  # SASRec model folder (bigrec.baselines), for use_ci
    domain: str = "movie"  # prompt wording (bigrec.data.prompts.DOMAINS)
    prompt_template: str = "alpaca"
    prompt_titles: str = "catalogue"  # titles in prompts as the catalogue writes them, or "natural" (bigrec prepare)
    precision: str = "auto"
    pooling: str = "last"  # how the index and the generations are embedded (bigrec.grounding.embedding.Grounding)
    embed_layer: int = -1
    title_text: str = "bare"
    num_beams: int = 4
    max_new_tokens: int = 64
    ci_gamma: float | None = None  # gamma for SASRec re-weighting, chosen on validation
    use_ci: bool = False  # the ranking recommend/serve give by default: the better on validation NDCG@10
    ci_blend_weight: float | None = None  # set: CI re-weights as the blend (1-w) minmax(d) - w minmax(s), not the paper's
    ranking_note: str | None = None  # how that choice was made, shown with every recommendation
    popularity_gamma: float | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> RunManifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a finished run folder (no {MANIFEST}); run `bigrec demo` first")
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
        if "base_model" not in data:
            raise ValueError(f"{path}: missing key 'base_model'")
        return cls(**data)

    def save(self, run_dir: str | Path) -> None:
        write_yaml(Path(run_dir) / MANIFEST, dataclasses.asdict(self))

    def path(self, run_dir: str | Path, field: str) -> Path | None:
        """The absolute path of a manifest entry, or None when the entry is unset."""
        value = getattr(self, field)
        return None if value is None else (Path(run_dir) / value).resolve()
