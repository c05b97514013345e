"""How scripts under benchmarks/ and tests/ import each other without editing ``sys.path``: the
shared pieces live in ``benchmarks/common.py`` (which imports neither side), and a script that
needs the working tree reruns itself with it on ``PYTHONPATH`` (``device.use_working_tree``)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

from device import QUIET_ENV, REPO, working_tree_env

LEAD = [str(REPO / "src"), str(REPO / "tests"), str(REPO / "benchmarks")]


def test_no_script_edits_sys_path():
    edits = []
    for path in sorted([*(REPO / "tests").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                edits.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not edits, "sys.path used (put the folder on PYTHONPATH instead): " + ", ".join(edits)


def test_common_imports_no_test_module_and_no_other_benchmark():
    tree = ast.parse((REPO / "benchmarks" / "common.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    local = {p.stem for folder in ("tests", "benchmarks") for p in (REPO / folder).iterdir()}
    assert not imported & local, imported & local


def test_working_tree_env_leads_pythonpath_keeps_the_rest_and_the_callers_settings():
    env = working_tree_env({"PYTHONPATH": os.pathsep.join(["/elsewhere", LEAD[1]]), "HF_HUB_OFFLINE": "0"})
    assert env["PYTHONPATH"].split(os.pathsep) == [*LEAD, "/elsewhere"]
    assert env["HF_HUB_OFFLINE"] == "0" and env["TQDM_DISABLE"] == QUIET_ENV["TQDM_DISABLE"]
    assert working_tree_env(env) == env  # already there: a rerun would find nothing to change


def test_a_script_reruns_itself_on_the_working_tree_with_its_arguments(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("import json, os, sys\nfrom device import use_working_tree\nprint('started', flush=True)\n"
                      "use_working_tree()\nimport tiny, run_fixture, common\n"
                      "print(json.dumps({'argv': sys.argv[1:], 'path': os.environ['PYTHONPATH'], "
                      "'quiet': os.environ['TQDM_DISABLE']}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", *QUIET_ENV)}
    env["PYTHONPATH"] = str(REPO / "benchmarks")  # enough to find device/, not tests/
    proc = subprocess.run([sys.executable, "-X", "utf8", str(script), "--flag", "a b"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["started", "started"]  # once as started, once rerun; the rerun goes on
    out = json.loads(lines[2])
    assert out["argv"] == ["--flag", "a b"] and out["path"].split(os.pathsep)[:3] == LEAD and out["quiet"] == "1"
