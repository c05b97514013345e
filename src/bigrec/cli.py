"""The ``bigrec`` command: one subcommand per pipeline stage.

Each stage lives in its own module, which exposes a ``Config`` dataclass and ``run(config)``.
Modules are imported only when their subcommand runs, so ``bigrec prepare`` does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import traceback
from contextlib import contextmanager

from bigrec import __version__
from bigrec.config import ConfigError, add_dataclass_arguments, from_args
from bigrec.io import InputError

# subcommand -> (module, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("bigrec.stages.prepare", "prepare a public dataset: catalogue, time splits, instruction files"),
    "train": ("bigrec.stages.train", "LoRA (or full) instruction tuning of a causal LM"),
    "generate": ("bigrec.stages.generate", "batched beam-search generation for instruction rows"),
    "index": ("bigrec.stages.index", "embed every catalogue title with the base model"),
    "evaluate": ("bigrec.stages.evaluate", "ground generations to items and compute all-rank NDCG/HR"),
    "baseline": ("bigrec.stages.baseline", "train and evaluate popularity or SASRec on the prepared splits"),
    "demo": ("bigrec.stages.demo", "the whole pipeline on the bundled default (SmolLM2-135M, ml-100k)"),
    "package": ("bigrec.stages.package", "turn a bigrec train output and its prepared data into a run folder to serve"),
    "recommend": ("bigrec.stages.recommend", "recommend items for a history with a finished run"),
    "serve": ("bigrec.stages.serve", "HTTP recommendation service for a finished run"),
}


# Errors in what the user gave (options, config files, data files, rows, fields, a named file or
# folder that is missing or unwritable): one line naming it, no traceback. Anything else is a
# fault to report, with its type, and its traceback under -v.
INPUT_ERRORS = (ConfigError, InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                FileExistsError)

# Stages that handle SIGTERM themselves (uvicorn shuts the service down gracefully).
OWN_SIGNAL_HANDLING = {"serve"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that ``finally`` blocks remove temporary and staging files."""


def _terminate(signum, frame):
    raise Terminated


@contextmanager
def _sigterm_unwinds(stage: str):
    """While a stage runs, SIGTERM (a scheduler or ``kill``) unwinds like Ctrl-C instead of
    killing the process where it stands, which would leave half-written ``.tmp`` and ``.staging-*``
    files behind. Only the main thread may set signal handlers."""
    if stage in OWN_SIGNAL_HANDLING or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bigrec", description="BIGRec: LLM recommendation by bi-step grounding.")
    parser.add_argument("--version", action="version", version=f"bigrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    # Global options take no value, so the first bare word is the stage; only its module is imported.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for stage, (module_name, description) in STAGES.items():
        p = sub.add_parser(stage, help=description, description=description)
        if stage == chosen:
            module = importlib.import_module(module_name)
            add_dataclass_arguments(p, module.Config)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.stage is None:
        parser.print_help()
        return 2
    try:
        config = from_args(module.Config, args)
        with _sigterm_unwinds(args.stage):
            result = module.run(config)
    except INPUT_ERRORS as exc:
        print(f"bigrec {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"bigrec {args.stage}: {how}; finished work is kept and a rerun resumes", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a fault of bigrec or of what it runs on, not of the input: say which
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        hint = "" if args.verbose else " (rerun with -v for the traceback)"
        print(f"bigrec {args.stage}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0
