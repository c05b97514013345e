"""Atomic file output: every artifact is written to a temporary name and renamed into place.

A reader therefore sees either the old file or the whole new one, and a failed or killed
stage never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, ensure_ascii=False) + "\n")


def write_json_rows(path: str | Path, rows: list) -> None:
    """A JSON list with one row per line: valid JSON, diff-able, far smaller than indent=4."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    write_text(path, f"[\n{body}\n]\n" if rows else "[]\n")


def write_yaml(path: str | Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


class InputError(ValueError):
    """A file, row, field or value the user gave is wrong. The message names what and where;
    ``bigrec`` prints it as one line, without a traceback, since the fix is in the input."""


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from exc


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: where and what (PyYAML's own message spans several lines)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (problem or " ".join(str(exc).split()))


def read_yaml_mapping(path: str | Path, error: type[ValueError] = InputError,
                      what: str = "a mapping of keys to values") -> dict:
    """A YAML file that must hold a mapping (an empty file is an empty one); a parse error or
    another kind of document is one ``error`` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what}, got {type(data).__name__}")
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove ``folder/<prefix><pid>-*`` folders left by processes that no longer run (a SIGKILL
    skips every ``finally``); folders of a live process are left alone. Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_dir(out_dir: str | Path, whole: bool = False) -> Iterator[Path]:
    """Write a stage's files into a hidden staging folder, then move them into ``out_dir``.

    If the body raises, ``out_dir`` is left exactly as it was. ``whole``: the staging folder
    replaces ``out_dir`` as a whole (nothing of an earlier run stays beside the new files);
    otherwise its files replace their namesakes and the folder's other files stay (training
    keeps its checkpoints there). Staging folders of killed runs are removed on the next run.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: exists and is not a folder")
    parent = out_dir.parent if whole else out_dir
    prefix = f".{out_dir.name}.staging-" if whole else ".staging-"
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    if whole:
        remove_stale(parent, f".{out_dir.name}.old-")
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    try:
        yield stage
        if whole:
            old = parent / f".{out_dir.name}.old-{os.getpid()}-{stage.name[-8:]}"
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            for item in sorted(stage.iterdir()):
                target = out_dir / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
