"""The package layout stays what docs/architecture.md describes: stage commands on top, nothing
below them imports one, and the docs name only modules and paths that exist."""

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bigrec"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


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
    assert modules == ["__init__.py", "__main__.py", "cli.py", "config.py", "io.py"]
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


def test_docs_name_only_modules_and_paths_that_exist():
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for dotted in sorted(set(re.findall(r"\bbigrec(?:\.[a-z_]+)+", text))):
            if resolve(dotted) is None:
                missing.append(f"{doc.name}: {dotted}")
        for path in sorted(set(re.findall(r"\b(?:src|benchmarks|tests|docs)/[\w./-]+\.\w+", text))):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
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
