"""Checks that run in subprocesses: the CUDA-path tests and ``accelerate launch`` against a plain run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import free_port
from device import QUIET_ENV, REPO
from device.measure import cuda_available, fail, free_memory, row
from device.shapes import (
    ACCEL_GEN_ROWS,
    ACCEL_ROWS,
    NUM_BEAMS,
    PYTEST_RUNS,
    TINY_DIMS,
    build_model,
    make_rows,
    make_titles,
    write_rows,
)


def sub_env() -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    if not cuda_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # the same thread count in both runs compared on a CPU
    return env


def run_sub(cmd: list[str], timeout: float, log_path: Path) -> int:
    """Run ``cmd`` in the repository root, output to ``log_path``; on timeout kill its process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=sub_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"{log_path.stem} ran over the {timeout:g} s limit (--timeout); log {log_path}") \
                from None


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        tail = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return ""
    return " | ".join(tail)[-300:]


def pytest_check(args, work: Path) -> dict:
    import xml.etree.ElementTree as ET

    r = row("pytest", "pytest: generate, decoding, index, train -k 'lora or labelled'", unit="tests")
    started = time.perf_counter()
    runs = PYTEST_RUNS
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing: list[str] = []
    try:
        for i, targets in enumerate(runs):
            xml = work / f"pytest-{i}.xml"
            logfile = work / f"pytest-{i}.log"
            code = run_sub([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={xml}", *targets],
                           args.timeout, logfile)
            if not xml.is_file():
                raise RuntimeError(f"pytest exited {code} without a report: {log_tail(logfile)}")
            root = ET.parse(xml).getroot()
            for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
                failing += [f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
                            for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]
            if code not in (0, 1):  # 1 = some tests failed (counted); anything else is pytest itself failing
                raise RuntimeError(f"pytest exited {code}: {log_tail(logfile)}")
        failed = counts["failures"] + counts["errors"]
        passed = counts["tests"] - failed - counts["skipped"]
        r["bigrec"] = passed
        r["details"] = {"passed": passed, "failed": failed, "skipped": counts["skipped"], "failing": failing,
                        "logs": [str(work / f"pytest-{i}.log") for i in range(len(runs))]}
        if failed or passed == 0:
            r["status"] = "FAIL"
            r["error"] = f"{failed} failed: {', '.join(failing[:4])}{' ...' if len(failing) > 4 else ''}"
    except Exception as exc:
        fail(r, exc)
    r["seconds"] = time.perf_counter() - started
    return r


def accelerate_check(args, work: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    r = row("accelerate", "accelerate launch vs plain (tiny): train + generate", unit="equal")
    started = time.perf_counter()
    d = r["details"]
    cuda = cuda_available()
    config = REPO / "src" / "bigrec" / "configs" / "accelerate" / ("multi_gpu.yaml" if cuda else "cpu.yaml")
    d["accelerate_config"] = str(config.relative_to(REPO))
    try:
        folder = work / "accelerate"
        shutil.rmtree(folder, ignore_errors=True)
        base = build_model(folder / "model", "llama", dict(TINY_DIMS, tie_word_embeddings=True), 400,
                           "cuda" if cuda else "cpu", seed=args.seed)
        titles = make_titles(60, seed=5)
        train = write_rows(folder / "train.json", make_rows(ACCEL_ROWS, titles, seed=50))
        test = write_rows(folder / "test.json", make_rows(ACCEL_GEN_ROWS, titles, seed=51))
        def launch() -> list[str]:
            return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                    "--num_processes", "1", "--main_process_port", str(free_port()), "-m", "bigrec"]

        def plain() -> list[str]:
            return [sys.executable, "-m", "bigrec"]

        train_args = ["train", "--base_model", base, "--train_data_path", train, "--batch_size", "4",
                      "--micro_batch_size", "2", "--max_steps", "3", "--num_epochs", "1", "--learning_rate", "1e-3",
                      "--warmup_steps", "0", "--precision", "fp32", "--attention", "eager", "--save_steps", "100",
                      "--resume_from_checkpoint", "false", "--seed", str(args.seed)]
        outs = {}
        for how, prefix in (("accelerate", launch), ("plain", plain)):
            out = folder / f"train-{how}"
            code = run_sub([*prefix(), *train_args, "--output_dir", str(out)], args.timeout, folder / f"train-{how}.log")
            if code != 0 or not (out / "adapter_model.safetensors").is_file():
                raise RuntimeError(f"{how} training exited {code}: {log_tail(folder / f'train-{how}.log')}")
            outs[how] = load_file(str(out / "adapter_model.safetensors"))
        d["trained"] = "both"
        a, b = outs["accelerate"], outs["plain"]
        if set(a) != set(b):
            raise RuntimeError(f"the adapters hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        moved = max(float(b[k].float().abs().max()) for k in b if "lora_B" in k)
        d.update(adapters_equal=all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6) for k in a),
                 adapters_identical=all(torch.equal(a[k], b[k]) for k in a), adapter_max_abs_diff=diff,
                 lora_B_max_abs=moved)
        gen_args = ["generate", "--base_model", base, "--lora_weights", str(folder / "train-plain"),
                    "--test_data_path", test, "--batch_size", "4", "--num_beams", str(NUM_BEAMS),
                    "--max_new_tokens", "16", "--precision", "fp32"]
        preds = {}
        for how, prefix in (("accelerate", launch), ("plain", plain)):
            out = folder / f"generate-{how}.json"
            code = run_sub([*prefix(), *gen_args, "--result_json_data", str(out)], args.timeout,
                           folder / f"generate-{how}.log")
            if code != 0 or not out.is_file():
                raise RuntimeError(f"{how} generation exited {code}: {log_tail(folder / f'generate-{how}.log')}")
            preds[how] = [x["predict"] for x in json.loads(out.read_text())]
        same = sum(x[0] == y[0] for x, y in zip(preds["accelerate"], preds["plain"], strict=True))
        r["agreement"] = same / len(preds["plain"])
        d.update(generate_rows=len(preds["plain"]), same_top1=same,
                 same_all_beams=sum(x == y for x, y in zip(preds["accelerate"], preds["plain"], strict=True)))
        if not d["adapters_equal"] or same != len(preds["plain"]):
            r["status"] = "FAIL"
            r["error"] = (f"adapters {'equal' if d['adapters_equal'] else 'differ'} (max |diff| {diff:.2e}); "
                          f"top-1 equal on {same}/{len(preds['plain'])} rows")
        shutil.rmtree(folder / "model", ignore_errors=True)
    except Exception as exc:
        fail(r, exc)
    free_memory()
    r["seconds"] = time.perf_counter() - started
    return r

