"""The package layout stays what docs/architecture.md describes: stage commands on top, nothing
below them imports one, and the docs (README.md and docs/**/*.md) name only modules, paths, links,
stages, make targets and benchmark scripts that exist."""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bigrec"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def imported_modules(path: Path) -> set[str]:
    """Every ``bigrec...`` module a file imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("bigrec")}


def test_no_module_below_the_stage_commands_imports_one():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "stages" or relative.name in {"cli.py", "__main__.py"}:
            continue
        stages = sorted(m for m in imported_modules(path) if m == "bigrec.stages" or m.startswith("bigrec.stages."))
        if stages:
            offenders.append(f"{relative}: {', '.join(stages)}")
    assert not offenders, "modules below the stage commands import a stage: " + "; ".join(offenders)


def test_the_cli_names_a_stage_module_for_every_stage():
    from bigrec.cli import STAGES

    for stage, (module, _) in STAGES.items():
        assert module == f"bigrec.stages.{stage}", stage
        assert importlib.util.find_spec(module) is not None, module


def test_the_top_level_holds_only_the_entry_points_and_shared_plumbing():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert modules == ["__init__.py", "__main__.py", "cli.py", "config.py", "io.py", "runner.py"]
    assert packages == ["app", "baselines", "data", "evaluation", "grounding", "llm", "stages"]


def resolve(dotted: str) -> object | None:
    """The module or attribute a dotted name means: modules as deep as they go, then attributes."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for depth in range(1, len(parts)):
        name = ".".join(parts[:depth + 1])
        if hasattr(obj, "__path__") and importlib.util.find_spec(name) is not None:
            obj = importlib.import_module(name)
        else:
            obj = getattr(obj, parts[depth], None)
            if obj is None:
                return None
    return obj


def name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def code(text: str) -> list[str]:
    """The text of a document's fenced blocks and inline code spans, where commands are named."""
    blocks = FENCE.findall(text)
    return blocks + re.findall(r"`([^`]+)`", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", doc.read_text(encoding="utf-8")), re.MULTILINE):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def test_docs_link_only_to_files_and_headings_that_exist():
    broken = []
    for doc in DOCS:
        text = FENCE.sub("", doc.read_text(encoding="utf-8"))
        for target in LINK.findall(text) + REFERENCE.findall(text):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{name(doc)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{name(doc)}: {target} (no such heading)")
    assert not broken, "docs link to what does not exist: " + "; ".join(broken)


def named_in_code(command: str) -> list[tuple[str, str]]:
    """(doc, word) for every ``command WORD`` inside a code span or block of README and docs."""
    pattern = rf"(?<![\w./-]){command}\s+([a-z][\w-]*)"
    return [(name(doc), word) for doc in DOCS for snippet in code(doc.read_text(encoding="utf-8"))
            for word in re.findall(pattern, snippet)]


def test_docs_name_only_real_stages():
    from bigrec.cli import STAGES

    unknown = [f"{where}: bigrec {stage}" for where, stage in named_in_code("bigrec") if stage not in STAGES]
    assert not unknown, "docs name stages bigrec.cli.STAGES lacks: " + "; ".join(sorted(set(unknown)))


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for line in re.findall(r"^([^\s#=:$][^=:#]*?)\s*::?(?!=)", text, re.MULTILINE):
        targets |= set(line.split())
    return targets


def test_docs_name_only_real_make_targets():
    targets = makefile_targets()
    assert {"demo", "test"} <= targets
    unknown = [f"{where}: make {target}" for where, target in named_in_code("make") if target not in targets]
    assert not unknown, "docs name Makefile targets that do not exist: " + "; ".join(sorted(set(unknown)))


def test_docs_name_only_benchmark_scripts_that_exist():
    missing = []
    for doc in DOCS:
        for script in re.findall(r"(?<![\w.-])benchmarks/([\w.-]+\.py)\b", doc.read_text(encoding="utf-8")):
            if not (ROOT / "benchmarks" / script).is_file():
                missing.append(f"{name(doc)}: benchmarks/{script}")
    assert not missing, "docs name benchmark scripts that do not exist: " + "; ".join(sorted(set(missing)))


def test_docs_cover_the_readme_and_every_nested_page():
    names = {name(doc) for doc in DOCS}
    assert "README.md" in names
    assert names >= {name(p) for p in (ROOT / "docs").rglob("*.md")}


def test_docs_name_only_modules_and_paths_that_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for dotted in sorted(set(re.findall(r"\bbigrec(?:\.[a-z_]+)+", text))):
            if resolve(dotted) is None:
                missing.append(f"{name(doc)}: {dotted}")
        for path in sorted(set(re.findall(r"\b(?:src|benchmarks|tests|docs)/[\w./-]+\.\w+", text))):
            if not (ROOT / path).exists():
                missing.append(f"{name(doc)}: {path}")
    assert not missing, "docs name what does not exist: " + "; ".join(missing)


# package -> the packages it may import (docs/architecture.md, "Dependencies between the packages")
ALLOWED = {
    "io": set(), "config": set(),
    "data": {"io", "config"},
    "llm": {"io", "config", "data"},
    "evaluation": {"io", "config", "data"},
    "baselines": {"io", "config", "data"},
    "grounding": {"io", "config", "data", "llm", "evaluation"},
    "app": {"io", "config", "data", "llm", "evaluation", "baselines", "grounding"},
}


def test_packages_import_only_the_packages_below_them():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        package = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        if package not in ALLOWED:
            continue
        for module in imported_modules(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] != package and parts[1] not in ALLOWED[package]:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, "; ".join(sorted(wrong))
