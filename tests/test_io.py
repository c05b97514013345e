"""Staged output folders: swapped in whole, left untouched on failure, stale staging cleaned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bigrec import cli, io


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_whole_folder_replaces_every_earlier_file(tmp_path):
    out = tmp_path / "data"
    with io.staged_dir(out, whole=True) as stage:
        (stage / "a.json").write_text("1")
        (stage / "valid_5000.json").write_text("old")
    with io.staged_dir(out, whole=True) as stage:
        (stage / "a.json").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"] and (out / "a.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging or old folder left


def test_failure_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "data"
    with io.staged_dir(out, whole=True) as stage:
        (stage / "a.json").write_text("1")
    with pytest.raises(RuntimeError), io.staged_dir(out, whole=True) as stage:
        (stage / "a.json").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("whole", [True, False])
def test_staging_of_a_killed_run_is_removed_next_time(tmp_path, whole):
    out = tmp_path / "data"
    out.mkdir()
    parent = tmp_path if whole else out
    prefix = ".data.staging-" if whole else ".staging-"
    stale = parent / f"{prefix}{dead_pid()}-abc"
    live = parent / f"{prefix}{os.getpid()}-def"  # a run still going: kept
    for folder in (stale, live):
        folder.mkdir()
        (folder / "big.csv").write_text("x" * 100)
    with io.staged_dir(out, whole=whole) as stage:
        (stage / "a.json").write_text("1")
    assert not stale.exists() and live.is_dir()


def test_output_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert cli.main(["prepare", "--dataset", "ml-100k", "--out", str(target), "--source", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(target) in err


def test_read_yaml_mapping_names_the_file_and_the_problem(tmp_path):
    from bigrec.io import InputError, read_yaml_mapping

    path = tmp_path / "run.yaml"
    path.write_text("")
    assert read_yaml_mapping(path) == {}
    path.write_text("a: 1\nb: [x, y]\n")
    assert read_yaml_mapping(path) == {"a": 1, "b": ["x", "y"]}
    path.write_text("a: [1\n")
    with pytest.raises(InputError, match=r"run.yaml: not valid YAML: line \d+, column \d+") as err:
        read_yaml_mapping(path)
    assert "\n" not in str(err.value)
    path.write_text("- a\n")
    with pytest.raises(ValueError, match="expected options, got list"):
        read_yaml_mapping(path, ValueError, "options")
    with pytest.raises(FileNotFoundError):
        read_yaml_mapping(tmp_path / "missing.yaml")
