"""Schemathesis over ``bigrec serve``: every operation in ``/openapi.json``, generated requests,
the checks for server errors and for conformance to the documented statuses, content types and
response schemas.

Starts ``bigrec serve`` on a free loopback port, on ``--run`` or on the tests' tiny run folder
(a tiny random model taught two answers, built in seconds), runs ``st run`` against it, and
prints schemathesis's report and the counts. Exits with schemathesis's status (0: no failure).

    PYTHONPATH=benchmarks python tests/fuzz_serve.py  # make fuzz: the long run
    pytest tests/test_fuzz.py                         # the fast suite's short run (--max_examples 10)

It imports ``common`` from benchmarks/: pytest puts benchmarks/ on the path (pyproject's
``pythonpath``), ``make fuzz`` sets ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, wait_up

ROOT = Path(__file__).resolve().parents[1]

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def tiny_run(root: Path) -> Path:
    from run_fixture import build_run  # a sibling; imported here, as it loads torch

    return build_run(root)


def counts(report: str) -> dict[str, int]:
    """Generated cases and failures from schemathesis's summary ('150 generated, 1 found 1 unique failure')."""
    found = re.search(r"(\d+) generated(?:, (\d+) found (\d+) unique failures?)?", report)
    generated = int(found.group(1)) if found else 0
    return {"generated": generated, "failures": int(found.group(3)) if found and found.group(3) else 0}


def fuzz(run: Path, max_examples: int, seed: int) -> tuple[int, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([sys.executable, "-m", "bigrec", "serve", "--run", str(run), "--port", str(port),
                               "--log_level", "warning", "--threads", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_up(server, url)
        st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
        if st is None:
            raise RuntimeError("schemathesis's `st` is not installed: pip install -e '.[dev]'")
        out = subprocess.run([st, "run", f"{url}/openapi.json", "--checks", CHECKS, "--max-examples",
                              str(max_examples), "--seed", str(seed), "--no-color", "--request-timeout", "120"],
                             capture_output=True, text=True, timeout=3600, cwd=tempfile.gettempdir())
        # (cwd: schemathesis keeps a .schemathesis/ cache in its working folder, not in the work tree)
        return out.returncode, out.stdout + out.stderr
    finally:
        server.terminate()
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a finished run folder (default: the tests' tiny run)")
    parser.add_argument("--max_examples", type=int, default=100, help="examples per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bigrec-fuzz-") as tmp:
        run = Path(args.run) if args.run else tiny_run(Path(tmp))
        code, report = fuzz(run, args.max_examples, args.seed)
    print(report)
    found = counts(report)
    print(f"schemathesis: {found['generated']} requests generated, {found['failures']} unique failures, "
          f"exit status {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
