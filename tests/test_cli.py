"""The command line: SIGTERM unwinds a stage and leaves no half-written files."""

from __future__ import annotations

import os
import signal
import sys
import types
from dataclasses import dataclass

from bigrec import cli, io
from bigrec.config import option


def test_sigterm_unwinds_and_removes_staging_and_temporary_files(tmp_path, monkeypatch, capsys):
    @dataclass
    class Config:
        out: str = option(help="output folder")

    def run(config):
        with io.staged_dir(config.out) as stage, io.atomic_path(tmp_path / "result.json") as tmp:
            (stage / "half.txt").write_text("half")
            tmp.write_text("{")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM should have unwound the stage")

    module = types.ModuleType("fake_stage")
    module.Config, module.run = Config, run
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    monkeypatch.setitem(cli.STAGES, "fake", ("fake_stage", "a stage that is terminated"))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert cli.main(["fake", "--out", str(out)]) == 143
    assert "terminated; finished work is kept" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the stage's only
