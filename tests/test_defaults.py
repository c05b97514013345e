"""Every place that exposes one of the shared defaults (:mod:`bigrec.llm.defaults`) says its value:
the stage configs, run.yaml's manifest, the keyword defaults of the functions and the benchmarks'
command-line defaults (read from their source: their parsers are built inside ``main``)."""

import ast
import dataclasses
import importlib
import inspect
import string
from pathlib import Path

import pytest

from bigrec.llm import defaults

ROOT = Path(__file__).resolve().parents[1]
CONSTANTS = {name: value for name, value in vars(defaults).items() if name.isupper()}

# (module, dataclass, field) -> the constant its default must equal
FIELDS = {
    ("bigrec.stages.generate", "Config", "precision"): "PRECISION",
    ("bigrec.stages.generate", "Config", "decoding"): "DECODING",
    ("bigrec.stages.generate", "Config", "num_beams"): "NUM_BEAMS",
    ("bigrec.stages.generate", "Config", "max_new_tokens"): "MAX_NEW_TOKENS",
    ("bigrec.stages.generate", "Config", "length_penalty"): "LENGTH_PENALTY",
    ("bigrec.stages.generate", "Config", "batch_size"): "GENERATE_BATCH_SIZE",
    ("bigrec.stages.generate", "Config", "ghost_threshold"): "GHOST_THRESHOLD",
    ("bigrec.stages.generate", "Config", "cf_weight"): "CF_WEIGHT",
    ("bigrec.stages.generate", "Config", "candidates"): "CANDIDATES",
    ("bigrec.stages.generate", "Config", "search_nodes"): "SEARCH_NODES",
    ("bigrec.stages.generate", "Config", "prior_weight"): "PRIOR_WEIGHT",
    ("bigrec.stages.generate", "Config", "exclude_history"): "EXCLUDE_HISTORY",
    ("bigrec.stages.package", "Config", "decoding"): "DECODING",
    ("bigrec.stages.package", "Config", "num_beams"): "NUM_BEAMS",
    ("bigrec.stages.package", "Config", "max_new_tokens"): "MAX_NEW_TOKENS",
    ("bigrec.stages.package", "Config", "search_nodes"): "SEARCH_NODES",
    ("bigrec.stages.package", "Config", "prior_weight"): "PRIOR_WEIGHT",
    ("bigrec.stages.package", "Config", "exclude_history"): "EXCLUDE_HISTORY",
    ("bigrec.stages.evaluate", "Config", "precision"): "PRECISION",
    ("bigrec.stages.evaluate", "Config", "batch_size"): "EMBED_BATCH_SIZE",
    ("bigrec.stages.evaluate", "Config", "exclude_history"): "EXCLUDE_HISTORY",
    ("bigrec.stages.index", "Config", "precision"): "PRECISION",
    ("bigrec.stages.index", "Config", "batch_size"): "EMBED_BATCH_SIZE",
    # package falls back on train's precision for a train record without one
    ("bigrec.stages.train", "Config", "precision"): "PRECISION",
    # the demo: its own smaller likelihood budget, the shared value elsewhere
    ("bigrec.stages.demo", "Config", "precision"): "PRECISION",
    ("bigrec.stages.demo", "Config", "num_beams"): "NUM_BEAMS",
    ("bigrec.stages.demo", "Config", "constrained_beams"): "CONSTRAINED_BEAMS",
    ("bigrec.stages.demo", "Config", "max_new_tokens"): "MAX_NEW_TOKENS",
    ("bigrec.stages.demo", "Config", "gen_batch_size"): "GENERATE_BATCH_SIZE",
    ("bigrec.stages.demo", "Config", "prior_weight"): "PRIOR_WEIGHT",
    ("bigrec.stages.demo", "Config", "search_nodes"): "DEMO_SEARCH_NODES",
    ("bigrec.app.run_manifest", "RunManifest", "precision"): "PRECISION",
    ("bigrec.app.run_manifest", "RunManifest", "decoding"): "DECODING",
    ("bigrec.app.run_manifest", "RunManifest", "num_beams"): "NUM_BEAMS",
    ("bigrec.app.run_manifest", "RunManifest", "max_new_tokens"): "MAX_NEW_TOKENS",
    ("bigrec.app.run_manifest", "RunManifest", "search_nodes"): "SEARCH_NODES",
    ("bigrec.app.run_manifest", "RunManifest", "prior_weight"): "PRIOR_WEIGHT",
    ("bigrec.app.run_manifest", "RunManifest", "exclude_history"): "EXCLUDE_HISTORY",
}

# (module, function or Class.method, keyword) -> the constant its default must equal
SIGNATURES = {
    ("bigrec.llm.models", "load_model", "precision"): "PRECISION",
    ("bigrec.llm.generation", "generate_ids", "length_penalty"): "LENGTH_PENALTY",
    ("bigrec.llm.generation", "generate_batch", "length_penalty"): "LENGTH_PENALTY",
    ("bigrec.llm.kv_cache", "prompt_cache", "max_new_tokens"): "MAX_NEW_TOKENS",
    ("bigrec.llm.constrained", "constrained_generate", "num_beams"): "CONSTRAINED_BEAMS",
    ("bigrec.llm.constrained", "constrained_generate", "length_penalty"): "LENGTH_PENALTY",
    ("bigrec.llm.constrained", "constrained_generate", "cf_weight"): "CF_WEIGHT",
    ("bigrec.llm.constrained", "constrained_generate", "ghost_threshold"): "GHOST_THRESHOLD",
    ("bigrec.llm.constrained", "TrieLogitsProcessor.__init__", "cf_weight"): "CF_WEIGHT",
    ("bigrec.llm.likelihood", "TitleScorer.rank", "max_nodes"): "SEARCH_NODES",
    ("bigrec.grounding.index", "ensure_index", "precision"): "PRECISION",
    ("bigrec.grounding.index", "ensure_index", "batch_size"): "EMBED_BATCH_SIZE",
    ("bigrec.grounding.embedding", "embed_texts", "batch_size"): "EMBED_BATCH_SIZE",
}

# (benchmark script, flag) -> the value its default must equal (a constant's name, or a format of them)
BENCHMARK_FLAGS = {
    ("bench_generate.py", "--precision"): "PRECISION",
    ("bench_generate.py", "--batch_size"): "GENERATE_BATCH_SIZE",
    ("bench_generate.py", "--num_beams"): "NUM_BEAMS",
    ("bench_generate.py", "--max_new_tokens"): "MAX_NEW_TOKENS",
    ("bench_likelihood.py", "--candidates"): "CANDIDATES",
    ("bench_likelihood.py", "--search_nodes"): "SEARCH_NODES",
    ("bench_likelihood.py", "--batch_size"): "GENERATE_BATCH_SIZE",
    ("bench_evaluate.py", "--precision"): "PRECISION",
    ("bench_evaluate.py", "--batch_size"): "EMBED_BATCH_SIZE",
    ("bench_rank.py", "--precision"): "PRECISION",
    ("bench_rank.py", "--nodes"): "{DEMO_SEARCH_NODES},{SEARCH_NODES}",  # the demo's budget and generate's
    ("bench_decoding.py", "--precision"): "PRECISION",
    ("bench_decoding_quality.py", "--beams"): "CONSTRAINED_BEAMS",
    ("bench_new_titles.py", "--num_beams"): "NUM_BEAMS",
    ("bench_learning_curve.py", "--num_beams"): "NUM_BEAMS",
    ("bench_train.py", "--precision"): "PRECISION",
}

# benchmarks/device/shapes.py's names -> the constant each must equal
DEVICE_SHAPES = {"NUM_BEAMS": "NUM_BEAMS", "CANDIDATES": "CANDIDATES", "SEARCH_NODES": "SEARCH_NODES"}


def expected(name: str) -> object:
    """A constant's value, or a ``{NAME},{NAME}`` format of constants filled in."""
    return CONSTANTS[name] if name in CONSTANTS else name.format(**CONSTANTS)


def field_default(module: str, cls: str, name: str) -> object:
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert name in fields, f"{module}.{cls} has no field {name}"
    return fields[name].default


def keyword_default(module: str, qualname: str, name: str) -> object:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    parameter = inspect.signature(obj).parameters[name]
    assert parameter.default is not inspect.Parameter.empty, f"{module}.{qualname}({name}) has no default"
    return parameter.default


def flag_defaults(script: Path, flags: set[str]) -> dict[str, object]:
    """``flag -> default`` of the ``add_argument`` calls for ``flags`` in a script, each default
    evaluated with the names the script imports from bigrec.llm.defaults (any other name is an error)."""
    tree = ast.parse(script.read_text(encoding="utf-8"))
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "bigrec.llm.defaults":
            names |= {a.asname or a.name: CONSTANTS[a.name] for a in node.names}
    found = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and node.args and isinstance(node.args[0], ast.Constant)
                and node.args[0].value in flags):
            continue
        for keyword in node.keywords:
            if keyword.arg == "default":
                code = compile(ast.Expression(keyword.value), str(script), "eval")
                found[node.args[0].value] = eval(code, {"__builtins__": {}}, dict(names))
    return found


def test_the_defaults_module_holds_only_plain_values_and_imports_nothing():
    tree = ast.parse(Path(defaults.__file__).read_text(encoding="utf-8"))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    plain = bool | int | float | str
    assert CONSTANTS and all(isinstance(v, plain) or isinstance(v, tuple) and all(isinstance(x, plain) for x in v)
                             for v in CONSTANTS.values())


# options whose choices are a list of defaults.py (each place that offers the choice offers that list)
CHOICES = {
    ("bigrec.stages.generate", "Config", "decoding"): "DECODINGS",
    ("bigrec.stages.package", "Config", "decoding"): "DECODINGS",
}


@pytest.mark.parametrize(("module", "cls", "name"), list(CHOICES))
def test_options_offer_the_shared_list(module, cls, name):
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(module), cls))}
    assert tuple(fields[name].metadata["choices"]) == CONSTANTS[CHOICES[module, cls, name]]


def test_every_decoding_is_one_a_run_folder_can_name_and_the_demo_can_run():
    from bigrec.app.run_manifest import RunManifest
    from bigrec.stages import demo

    for decoding in defaults.DECODINGS:
        assert RunManifest(base_model="m", decoding=decoding).decoding == decoding
        demo.Config(decoding=decoding).validate()
    with pytest.raises(ValueError, match="not one of free, constrained, likelihood"):
        RunManifest(base_model="m", decoding="greedy")


def test_every_constant_is_checked_somewhere():
    used = set(FIELDS.values()) | set(SIGNATURES.values()) | set(DEVICE_SHAPES.values()) | set(CHOICES.values())
    for value in BENCHMARK_FLAGS.values():
        used |= {value} if value in CONSTANTS else {n for _, n, _, _ in string.Formatter().parse(value) if n}
    assert set(CONSTANTS) <= used, f"constants no place is checked against: {sorted(set(CONSTANTS) - used)}"


@pytest.mark.parametrize(("module", "cls", "name"), list(FIELDS))
def test_configs_and_the_manifest_default_to_the_shared_value(module, cls, name):
    constant = FIELDS[module, cls, name]
    got = field_default(module, cls, name)
    assert got == CONSTANTS[constant] and type(got) is type(CONSTANTS[constant]), \
        f"{module}.{cls}.{name} defaults to {got!r}, not {constant} = {CONSTANTS[constant]!r}"


@pytest.mark.parametrize(("module", "qualname", "name"), list(SIGNATURES))
def test_function_keywords_default_to_the_shared_value(module, qualname, name):
    constant = SIGNATURES[module, qualname, name]
    got = keyword_default(module, qualname, name)
    assert got == CONSTANTS[constant] and type(got) is type(CONSTANTS[constant]), \
        f"{module}.{qualname}({name}=...) defaults to {got!r}, not {constant} = {CONSTANTS[constant]!r}"


@pytest.mark.parametrize("script", sorted({s for s, _ in BENCHMARK_FLAGS}))
def test_benchmark_flags_default_to_the_shared_value(script):
    wanted = {flag: name for (where, flag), name in BENCHMARK_FLAGS.items() if where == script}
    found = flag_defaults(ROOT / "benchmarks" / script, set(wanted))
    for flag, name in wanted.items():
        assert flag in found, f"benchmarks/{script}: no default for {flag}"
        assert found[flag] == expected(name), \
            f"benchmarks/{script} {flag} defaults to {found[flag]!r}, not {name} = {expected(name)!r}"


def test_device_check_shapes_use_the_shared_values():
    from device import shapes

    for name, constant in DEVICE_SHAPES.items():
        assert getattr(shapes, name) == CONSTANTS[constant], f"benchmarks/device/shapes.py {name}"

