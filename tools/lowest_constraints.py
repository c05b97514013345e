"""Print pip constraints that pin each dependency to the lower bound pyproject.toml states.

`make test-min` installs the project with these (`pip install -c FILE -e ".[dev]"`) and runs the
fast suite, so every `name>=X` in [project].dependencies and the `dev` extra is tested at X.
Dependencies without a lower bound are left to float, and so are transitive ones.

    python tools/lowest_constraints.py [pyproject.toml] > constraints.txt
"""

import re
import sys
import tomllib
from pathlib import Path

EXTRAS = ("dev",)
LOWER = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*(?:;.*)?$")


def lowest(requirement: str) -> str | None:
    """'torch>=2.4' -> 'torch==2.4'; None when the requirement states no lower bound."""
    match = LOWER.match(requirement)
    if not match:
        raise SystemExit(f"cannot read requirement {requirement!r}")
    name, specs = match.groups()
    bounds = [spec.strip()[2:].strip() for spec in specs.split(",") if spec.strip().startswith(">=")]
    return f"{name}=={bounds[0]}" if bounds else None


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    project = tomllib.loads(path.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    for requirement in requirements:
        pin = lowest(requirement)
        if pin:
            print(pin)


if __name__ == "__main__":
    main()
