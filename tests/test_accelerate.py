"""``bigrec train`` under ``accelerate launch``: two CPU processes train one adapter together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from test_train import make_rows, write_rows


def test_two_cpu_processes_train_one_adapter(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "train.json", make_rows(16))
    val = write_rows(tmp_path / "valid.json", make_rows(4, offset=1))
    out = tmp_path / "run"
    cpu_config = files("bigrec") / "configs" / "accelerate" / "cpu.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config),
           "--num_processes", "2", "--num_cpu_threads_per_process", "1", "-m", "bigrec", "train",
           "--base_model", tiny_model_dir, "--train_data_path", data, "--val_data_path", val,
           "--output_dir", str(out), "--batch_size", "2", "--micro_batch_size", "2", "--num_epochs", "1",
           "--precision", "fp32", "--warmup_steps", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in log if r.get("event") == "start"] == [2]  # one log, written by rank 0
    # 16 rows, 2 per process and step: 4 steps with two processes sharing the data (8 alone).
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert len([r for r in log if "eval_loss" in r]) == 1
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["run"]["world_size"] == 2 and resolved["status"] == "done"
    assert sorted(p.name for p in out.rglob("adapter_model.safetensors") if "checkpoint-" not in str(p)) \
        == ["adapter_model.safetensors"] * 2  # the adapter, and the best one it was copied from
    assert (out / "adapter_model.safetensors").is_file() and Path(out / "best").is_dir()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
