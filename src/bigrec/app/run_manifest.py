"""``run.yaml``: what a finished run folder holds, so recommend/serve rebuild everything from it.

Paths in the manifest are relative to the run folder, so a run folder can be moved or copied
to another machine as a whole (with what its paths point at, where they lead out of it).

``domain`` words the prompts as ``bigrec prepare`` worded the training rows: the name of a
:data:`bigrec.data.prompts.DOMAINS` entry, or the words themselves (``plural``, ``singular``,
``verb``) for a category's wording such as "office products"; :func:`prepared_domain` reads
them from a prepared data folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bigrec.data.prompts import DOMAINS, Domain, domain_for_plural
from bigrec.io import InputError, read_json, read_yaml_mapping, write_yaml
from bigrec.llm.defaults import (
    CANDIDATES,
    CF_WEIGHT,
    DECODING,
    DECODINGS,
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
from bigrec.llm.layouts import LAYOUTS, get_layout

if TYPE_CHECKING:
    from bigrec.llm.decoders import DecodingConfig

MANIFEST = "run.yaml"
# the Python types a run.yaml value may have, by the name a field's annotation gives (a float may be written 1)
_KINDS = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict, "None": type(None)}
SASREC_LIVE = "the run's SASRec (scored per request)"  # the decoders' cf_scores when the service scores live


@dataclass
class RunManifest:
    base_model: str  # as given to --base_model (folder, hub id or bundled name)
    catalog: str = "data/id2name.txt"  # the catalogue the index was built from
    index: str = "index.safetensors"  # item embeddings (bigrec.stages.index)
    data: str | None = "data"  # prepared dataset folder, for --user lookups and popularity
    adapter: str | None = "adapter"  # LoRA adapter folder; None = the base model alone
    sasrec: str | None = "sasrec"  # SASRec model folder (bigrec.baselines), for use_ci
    domain: str | dict = "movie"  # prompt wording: a DOMAINS name, or {plural, singular, verb} (prepared_domain)
    prompt_template: str = "alpaca"
    prompt_titles: str = "catalogue"  # titles in prompts as the catalogue writes them, or "natural" (bigrec prepare)
    precision: str = PRECISION
    pooling: str = "last"  # how the index and the generations are embedded (bigrec.grounding.embedding.Grounding)
    embed_layer: int = -1
    title_text: str = "bare"
    num_beams: int = NUM_BEAMS  # free and constrained: beams per request
    max_new_tokens: int = MAX_NEW_TOKENS  # free: most generated tokens
    length_penalty: float = LENGTH_PENALTY  # free and constrained: beam scores divided by length ** this
    length_correction: bool = False  # constrained: D3's length correction (generate --length_correction)
    ghost_threshold: float = GHOST_THRESHOLD  # constrained, with length_correction
    cf_weight: float = CF_WEIGHT  # constrained: weight of SASRec's log-scores guiding the beams (generate --cf_weight)
    ci_gamma: float | None = None  # gamma for SASRec re-weighting, chosen on validation
    use_ci: bool = False  # the ranking recommend/serve give by default: the better on validation NDCG@10
    ci_blend_weight: float | None = None  # set: CI re-weights as the blend (1-w) minmax(d) - w minmax(s), not the paper's
    ranking_note: str | None = None  # how that choice was made, shown with every recommendation
    popularity_gamma: float | None = None
    layout: str = "window"  # the training text's layout (bigrec.llm.layouts): how prompts and titles are written
    decoding: str = DECODING  # free: beam search + L2 grounding (the paper's); constrained: beam search over the
    # catalogue's titles; likelihood: every title by its log-probability (bigrec.llm.decoders)
    prior_weight: float = PRIOR_WEIGHT  # likelihood: minus this times log p(title | an empty history)
    search_nodes: int = SEARCH_NODES  # likelihood: the most title tokens a history's search feeds the model
    exclude_history: bool = EXCLUDE_HISTORY  # leave the history's titles out where a request does not say
    likelihood_cf_weight: float | None = None  # likelihood: SASRec's weight in log p + w * minmax(s), chosen on
    # validation (bigrec.grounding.likelihood_cf); with use_ci, a likelihood run answers with that blend
    candidates: int = CANDIDATES  # likelihood + SASRec: the top titles of each model the blend ranks (generate's)
    likelihood_content_weight: float = 0.0  # likelihood + SASRec: the last history title's weight c in
    # + c * minmax(-L2 distance to it), chosen on validation with likelihood_cf_weight (0: no content term)

    def __post_init__(self) -> None:
        for name, value, allowed in (("decoding", self.decoding, DECODINGS), ("layout", self.layout, LAYOUTS)):
            if value not in allowed:
                raise InputError(f"{MANIFEST}: {name} {value!r} is not one of {', '.join(allowed)}")
        if self.prior_weight < 0 or self.search_nodes < 1:
            raise InputError(f"{MANIFEST}: prior_weight must be at least 0 and search_nodes at least 1")
        if (self.likelihood_cf_weight is not None and self.likelihood_cf_weight < 0) or self.candidates < 1:
            raise InputError(f"{MANIFEST}: likelihood_cf_weight must be at least 0 and candidates at least 1")
        if self.likelihood_content_weight < 0:
            raise InputError(f"{MANIFEST}: likelihood_content_weight must be at least 0")
        if self.num_beams < 1 or not 0 < self.ghost_threshold <= 1 or self.cf_weight < 0:
            raise InputError(f"{MANIFEST}: num_beams must be at least 1, ghost_threshold in (0, 1] and cf_weight "
                             "at least 0")
        self.wording()  # an unknown name or malformed words are an error on load, not on the first request

    def wording(self) -> Domain:
        """The prompts' wording that ``domain`` names or spells out."""
        if isinstance(self.domain, str):
            if self.domain not in DOMAINS:
                raise InputError(f"{MANIFEST}: unknown domain {self.domain!r}; expected one of {', '.join(DOMAINS)} "
                                 "or {plural, singular, verb}")
            return DOMAINS[self.domain]
        keys = ("plural", "singular", "verb")
        if not isinstance(self.domain, dict) or sorted(self.domain) != sorted(keys) or not all(
                isinstance(self.domain[k], str) and self.domain[k].strip() for k in keys):
            raise InputError(f"{MANIFEST}: domain must be a name ({', '.join(DOMAINS)}) or a mapping of "
                             f"plural, singular and verb to words, got {self.domain!r}")
        return Domain(**{k: self.domain[k] for k in keys})

    @classmethod
    def load(cls, run_dir: str | Path) -> RunManifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a finished run folder (no {MANIFEST}); run `bigrec demo` first")
        data = read_yaml_mapping(path)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - set(fields))
        if unknown:
            raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}")
        if "base_model" not in data:
            raise InputError(f"{path}: missing key 'base_model'")
        for name, value in data.items():
            kinds = [_KINDS[kind] for kind in str(fields[name].type).split(" | ")]
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, tuple(kinds)):
                raise InputError(f"{path}: {name} {value!r} is not a {fields[name].type}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise InputError(f"{path}: {str(exc).removeprefix(MANIFEST + ': ')}") from None

    def decoding_config(self, run_dir: str | Path, has_sasrec: bool) -> DecodingConfig:
        """The settings ``bigrec generate`` would decode this run with (the decoders' config): the
        run's SASRec, scored per request, stands for a score file where the decoding takes one
        (likelihood + SASRec's candidates, constrained decoding's guidance)."""
        from bigrec.llm.decoders import DecodingConfig

        cf = has_sasrec and (self.likelihood_cf_weight is not None if self.decoding == "likelihood"
                             else self.decoding == "constrained" and self.cf_weight > 0)
        if self.decoding == "constrained" and self.cf_weight > 0 and not has_sasrec:
            raise InputError(f"{Path(run_dir) / MANIFEST}: cf_weight {self.cf_weight} guides constrained decoding "
                             "by SASRec's scores, but sasrec is unset")
        return DecodingConfig(
            decoding=self.decoding, batch_size=GENERATE_BATCH_SIZE, num_beams=self.num_beams,
            max_new_tokens=self.max_new_tokens, length_penalty=self.length_penalty, layout=self.layout,
            prompt_template=self.prompt_template, category=self.wording().plural,
            exclude_history=self.exclude_history, candidates=self.candidates, search_nodes=self.search_nodes,
            prior_weight=self.prior_weight, length_correction=self.length_correction,
            ghost_threshold=self.ghost_threshold, cf_scores=SASREC_LIVE if cf else None,
            cf_weight=self.cf_weight if self.decoding == "constrained" else 0.0,
            catalog=str(self.path(run_dir, "catalog")))

    def save(self, run_dir: str | Path) -> None:
        write_yaml(Path(run_dir) / MANIFEST, dataclasses.asdict(self))

    def path(self, run_dir: str | Path, field: str) -> Path | None:
        """The absolute path of a manifest entry, or None when the entry is unset."""
        value = getattr(self, field)
        return None if value is None else (Path(run_dir) / value).resolve()


def domain_value(domain: Domain) -> str | dict:
    """``domain`` as run.yaml writes it: the DOMAINS name where it is one, else its words."""
    for name, known in DOMAINS.items():
        if known == domain:
            return name
    return dataclasses.asdict(domain)


def prepared_domain(data_dir: str | Path) -> Domain:
    """The wording ``bigrec prepare`` gave the rows of ``data_dir``: from its config.yaml's
    ``domain_wording`` (every prepare records it; :func:`bigrec.data.prompts.domain_for_plural` rebuilds
    the rest as prepare built it), checked against the wording of the folder's test rows."""
    data_dir = Path(data_dir)
    record_path = data_dir / "config.yaml"
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path}: not found; give a data folder that bigrec prepare wrote")
    record = read_yaml_mapping(record_path)
    plural = record.get("domain_wording")
    if not isinstance(plural, str) or not plural.strip():
        raise InputError(f"{record_path}: no 'domain_wording' (the prompts' wording bigrec prepare used)")
    try:
        domain = domain_for_plural(plural)
    except ValueError as exc:
        raise InputError(f"{record_path}: {exc}") from None
    sample = data_dir / f"test_{record.get('sample_rows', 5000)}.json"
    if sample.is_file():  # a few thousand rows at most (test.json may hold millions)
        rows = read_json(sample)
        wanted = get_layout(record.get("layout", "window")).row(domain, [], "")["instruction"]
        if rows and isinstance(rows[0], dict) and rows[0].get("instruction") != wanted:
            raise InputError(f"{sample}: its rows' instruction {rows[0].get('instruction')!r} is not worded as "
                             f"{record_path} records (domain_wording {plural!r})")
    return domain
