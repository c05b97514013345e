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
from bigrec.llm.layouts import LAYOUTS

MANIFEST = "run.yaml"
DECODINGS = ("free", "likelihood")  # what recommend and serve rank by


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
    layout: str = "window"  # the training text's layout (bigrec.llm.layouts): how prompts and titles are written
    decoding: str = "free"  # free: beam search + L2 grounding (the paper's); likelihood: every title by its log-probability
    prior_weight: float = 0.0  # likelihood: minus this times log p(title | an empty history)
    search_nodes: int = 3072  # likelihood: the most title tokens a history's search feeds the model
    exclude_history: bool = False  # leave the history's titles out where a request does not say

    def __post_init__(self) -> None:
        for name, value, allowed in (("decoding", self.decoding, DECODINGS), ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"{MANIFEST}: {name} {value!r} is not one of {', '.join(allowed)}")
        if self.prior_weight < 0 or self.search_nodes < 1:
            raise ValueError(f"{MANIFEST}: prior_weight must be at least 0 and search_nodes at least 1")

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
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {str(exc).removeprefix(MANIFEST + ': ')}") from None

    def save(self, run_dir: str | Path) -> None:
        write_yaml(Path(run_dir) / MANIFEST, dataclasses.asdict(self))

    def path(self, run_dir: str | Path, field: str) -> Path | None:
        """The absolute path of a manifest entry, or None when the entry is unset."""
        value = getattr(self, field)
        return None if value is None else (Path(run_dir) / value).resolve()
