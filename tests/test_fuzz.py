"""Schemathesis over a real ``bigrec serve`` (tests/fuzz_serve.py; ``make fuzz`` runs it long)."""

from __future__ import annotations

import fuzz_serve
from run_fixture import tiny_run


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(tmp_path_factory, capsys):
    code = fuzz_serve.main(["--run", str(tiny_run(tmp_path_factory)), "--max_examples", "10"])
    out = capsys.readouterr().out
    found = fuzz_serve.counts(out)
    assert code == 0, out
    assert found["failures"] == 0 and found["generated"] >= 30, out
    assert "Operations:       3 selected / 3 total" in out  # /health, /items and /recommend


def test_counts_read_schemathesis_summary():
    assert fuzz_serve.counts("  150 generated, 1 found 1 unique failure\n") == {"generated": 150, "failures": 1}
    assert fuzz_serve.counts("  172 generated, 172 passed\n") == {"generated": 172, "failures": 0}
