"""The command line: SIGTERM unwinds a stage and leaves no half-written files; an error in the input is one
line naming it, any other error names its type and shows its traceback with -v."""

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


def _stage(monkeypatch, run) -> None:
    """Plug ``run`` into the real ``bigrec`` entry point as the stage ``fake``."""
    @dataclass
    class Config:
        out: str = option("x", "unused")

    module = types.ModuleType("fake_stage")
    module.Config, module.run = Config, run
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    monkeypatch.setitem(cli.STAGES, "fake", ("fake_stage", "a stage with a fault"))


def test_input_errors_are_one_line_naming_the_file(tmp_path, capsys):
    catalog = tmp_path / "id2name.txt"
    catalog.write_text("Heat (1995)\t0\nno tab here\n", encoding="utf-8")
    for verbose in ([], ["-v"]):
        code = cli.main([*verbose, "evaluate", "--catalog", str(catalog), "--input_dir", str(tmp_path),
                         "--output", str(tmp_path / "m.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and "Traceback" not in "\n".join(err)
        assert err[-1] == f"bigrec evaluate: error: {catalog}, line 2: expected 'title<TAB>id', found no tab"
    results = tmp_path / "results.json"
    results.write_text('[{"predict": "Heat", "output": "\\"Heat (1995)\\""}]', encoding="utf-8")
    catalog.write_text("Heat (1995)\t0\n", encoding="utf-8")
    assert cli.main(["evaluate", "--catalog", str(catalog), "--input_dir", str(results),
                     "--output", str(tmp_path / "m.json")]) == 1
    assert capsys.readouterr().err.strip() == (f"bigrec evaluate: error: {results}, row 0: field 'predict' must be a "
                                               "non-empty list of strings, got 'Heat'")
    assert cli.main(["evaluate", "--catalog", str(tmp_path / "nowhere.txt"), "--input_dir", str(results),
                     "--output", str(tmp_path / "m.json")]) == 1
    assert capsys.readouterr().err.strip() == f"bigrec evaluate: error: catalogue not found: {tmp_path / 'nowhere.txt'}"


def test_an_internal_error_says_so_and_shows_its_traceback_with_v(monkeypatch, capsys):
    """A ValueError or KeyError from bigrec's own code is a fault, not the user's input: its type
    is named, and -v prints where it happened."""
    import torch

    from bigrec.evaluation.metrics import ndcg_hr

    def faulty_metrics(config):
        return ndcg_hr(torch.zeros(0, dtype=torch.long))  # an internal check that fails

    _stage(monkeypatch, faulty_metrics)
    assert cli.main(["fake"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bigrec fake: internal error: ValueError: ranks must be [groups, rows] with rows > 0, got shape "
                   "(1, 0) (rerun with -v for the traceback)"]
    assert cli.main(["-v", "fake"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in faulty_metrics" in err and "in ndcg_hr_many" in err
    assert err.strip().splitlines()[-1].startswith("bigrec fake: internal error: ValueError: ranks must be")

    def faulty_lookup(config):
        return {"a": 1}["b"]

    _stage(monkeypatch, faulty_lookup)
    assert cli.main(["fake"]) == 1
    assert capsys.readouterr().err.strip() == ("bigrec fake: internal error: KeyError: 'b' "
                                               "(rerun with -v for the traceback)")


def test_a_bad_data_file_fails_in_one_line_from_the_shell(tmp_path):
    import subprocess

    data = tmp_path / "mydata"
    data.mkdir()
    (data / "mydata.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\n", encoding="utf-8")
    (data / "mydata.item").write_text("item_id:token\ttitle:token_seq\ni1\tHeat\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bigrec", "-v", "prepare", "--dataset", "recbole-atomic",
                           "--source", str(data), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bigrec prepare: error: ") and "mydata.inter" in last and "line 2" in last, last


def test_a_bad_run_yaml_is_one_line_naming_the_file_and_key(tmp_path, capsys):
    """recommend and serve read run.yaml before loading any model: each mistake in it is the input's,
    one line naming the file and the key (not an internal error)."""
    manifest = tmp_path / "run.yaml"
    cases = [("base_model: m\nbeams: 4\n", "unknown key(s) beams"),
             ("base_model: m\ndecoding: greedy\n", "decoding 'greedy' is not one of free, constrained, likelihood"),
             ("base_model: m\nlayout: grid\n", "layout 'grid' is not one of"),
             ("base_model: m\ndomain: office\n", "unknown domain 'office'"),
             ("base_model: m\nnum_beams: four\n", "num_beams 'four' is not a int"),
             ("base_model: m\nuse_ci: 1\n", "use_ci 1 is not a bool"),
             ("base_model: m\nprior_weight: -1\n", "prior_weight must be at least 0"),
             ("decoding: free\n", "missing key 'base_model'"),
             ("- base_model: m\n", "expected a mapping of keys to values, got list"),
             ("base_model: [m\n", "not valid YAML")]
    for stage in ("recommend", "serve"):
        for text, says in cases:
            manifest.write_text(text)
            extra = ["--history", "Heat"] if stage == "recommend" else []
            assert cli.main([stage, "--run", str(tmp_path), *extra]) == 1, text
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "internal error" not in err[0], err
            assert err[0].startswith(f"bigrec {stage}: error: {manifest}: ") and says in err[0], (text, err)
