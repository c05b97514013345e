"""Stage configs as dataclasses: a YAML file sets values, command-line flags override them.

Every stage module defines a ``@dataclass`` whose fields carry ``help`` metadata (use
:func:`option`). :func:`add_dataclass_arguments` turns it into argparse flags named after the
fields (the reference scripts' names, e.g. ``--base_model``), and :func:`from_args` merges the
``--config`` YAML file (unknown keys are errors) under the flags that were actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices=None,
           aliases: tuple[str, ...] = (), split: bool = True, minimum: float | None = None,
           changes_output: bool = True, keyed_at_default: bool = True):
    """A dataclass field with help text for the command line.

    ``choices`` and ``minimum`` are checked in one place, :func:`build`, for flags and YAML
    values alike (None, where the field allows it, is never checked). ``aliases`` adds flags
    such as ``-k``; ``split=False`` makes a list option take each flag's value whole (titles
    contain commas), so only repeating the flag adds items. ``changes_output=False`` marks an
    option that leaves the stage's outputs as they are (where progress is logged): it is no part
    of the settings that decide whether a finished stage must rerun (:func:`stage_settings`);
    ``keyed_at_default=False`` leaves an option out of them while it holds its default, which
    must be what a run whose recorded settings lack the option did (so adding it reruns nothing).
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "split": split, "minimum": minimum,
            "changes_output": changes_output, "keyed_at_default": keyed_at_default}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key and the file."""


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in {"1", "true", "yes", "y", "on"}:
        return True
    if value in {"0", "false", "no", "n", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_list(text: str | list) -> list[str]:
    """Accept ``a,b``, ``[a,b]``, ``['a', 'b']`` (the reference's ``'[q_proj,v_proj]'``) or a list."""
    if isinstance(text, list | tuple):
        return [str(x) for x in text]
    body = str(text).strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [part.strip().strip("'\"") for part in body.split(",") if part.strip()]


def parse_float(text: str | float) -> float:
    """A float that is a number: ``nan`` and ``inf`` (which ``float()`` takes) are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


parse_float.__name__ = "finite number"  # argparse names the type in its error: "invalid finite number value"


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``X | None`` and return (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _converter(tp: Any):
    base, optional = _base_type(tp)
    origin = typing.get_origin(base)
    if base is bool:
        conv = parse_bool
    elif origin is list or base is list:
        inner = (typing.get_args(base) or (str,))[0]
        inner = parse_float if inner is float else inner
        conv = (lambda s, inner=inner: [inner(x) for x in parse_list(s)])  # noqa: E731
    elif base is float:
        conv = parse_float
    elif base in (int, str):
        conv = base
    else:
        conv = str
    if optional:
        def maybe(s, conv=conv):
            if s is None or (isinstance(s, str) and s.strip().lower() in {"none", "null", ""}):
                return None
            return conv(s)
        return maybe
    return conv


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one ``--name`` flag per field, plus ``--config FILE.yaml``."""
    parser.add_argument("--config", default=None, help="YAML file with values for these options; flags override it")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        conv = _converter(hints[f.name])
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        kwargs: dict[str, Any] = dict(dest=f.name, type=conv, default=argparse.SUPPRESS,
                                      help=f"{help_text} (default: {default!r})" if not required else help_text + " (required)")
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if base is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = True
        if typing.get_origin(base) is list:
            kwargs["action"] = _ListAction
            if not f.metadata.get("split", True):
                kwargs["type"] = str
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kwargs)


class _ListAction(argparse.Action):
    """``--x a --x b``, ``--x a,b`` and ``--x '[a,b]'`` all give ``[a, b]`` (without ``split``,
    each flag's value is one item)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if not isinstance(current, list) or getattr(namespace, f"_{self.dest}_fresh", True):
            current = []
            setattr(namespace, f"_{self.dest}_fresh", False)
        setattr(namespace, self.dest, current + (list(values) if isinstance(values, list) else [values]))


SHIPPED = Path(__file__).parent / "configs"  # configs that ship with the package, named by their stem


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or from a shipped config named without folder or suffix
    (``--config paper`` reads ``bigrec/configs/paper.yaml``)."""
    path = Path(path)
    if not path.is_file() and path.parent == Path(".") and (SHIPPED / f"{path.name}.yaml").is_file():
        path = SHIPPED / f"{path.name}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
        raise ConfigError(f"config file not found: {path}" + (f" (shipped configs: {shipped})" if shipped else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def build(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Make a ``cls`` from a mapping, converting strings and refusing unknown keys."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    converted = {}
    no_split = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("split", True)}
    for key, value in values.items():
        conv = (lambda v: [str(x) for x in v] if isinstance(v, list | tuple) else [str(v)]) if key in no_split \
            else _converter(hints[key])
        try:
            converted[key] = value if value is None and _base_type(hints[key])[1] else conv(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{source}: option {key!r}: {exc}") from exc
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in converted
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing required option(s) {', '.join('--' + m for m in missing)}")
    obj = cls(**converted)
    check_bounds(obj, source)
    post = getattr(obj, "validate", None)
    if callable(post):
        try:
            post()
        except ConfigError:
            raise
        except ValueError as exc:  # validate() checks option values: a wrong one is the user's to fix
            raise ConfigError(str(exc)) from exc
    return obj


def check_bounds(obj: Any, source: str = "config") -> None:
    """Every field's declared ``choices`` and ``minimum`` (see :func:`option`)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices and value not in choices:
            raise ConfigError(f"{source}: --{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{source}: --{f.name} must be at least {minimum}, got {value}")


def check_output_dir(path: str | Path, flag: str) -> None:
    """An output folder option must not name a file (checked before any slow work starts)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"--{flag}: {path} exists and is not a folder")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Merge ``--config`` YAML values under the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return build(cls, values, source=getattr(args, "config", None) or "command line")


def parse(cls: type[T], argv: list[str] | None = None, prog: str | None = None) -> T:
    """Parse a stage config from argv (used by tests and ``python -m``)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_dataclass_arguments(parser, cls)
    return from_args(cls, parser.parse_args(argv))


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def stage_settings(config: Any) -> dict[str, Any]:
    """The settings that decide a stage's outputs: :func:`to_dict` less ``changes_output=False`` options."""
    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    quiet = {f.name for f in dataclasses.fields(config) if not f.metadata.get("changes_output", True)
             or (not f.metadata.get("keyed_at_default", True) and getattr(config, f.name) == default(f))}
    return {k: v for k, v in to_dict(config).items() if k not in quiet}
