"""Option checks declared once on the option and enforced for flags and YAML files alike."""

from __future__ import annotations

import pytest

from bigrec import cli
from bigrec.config import ConfigError, parse, to_dict
from bigrec.stages.baseline import Config as BaselineConfig
from bigrec.stages.demo import Config as DemoConfig
from bigrec.stages.generate import Config as GenerateConfig
from bigrec.stages.prepare import Config as PrepareConfig


@pytest.mark.parametrize("stage, yaml_text, message", [
    ("baseline", "data: d\noutput_dir: o\nmodel: popularty\n", "--model must be one of popularity, sasrec, got 'popularty'"),
    ("baseline", "data: d\noutput_dir: o\nloss: focal\n", "--loss must be one of ce, bce, got 'focal'"),
    ("prepare", "dataset: amazn\nout: o\n", "--dataset must be one of"),
    ("generate", "test_data_path: t\nresult_json_data: r\nnum_beams: 0\n", "--num_beams must be at least 1, got 0"),
    ("demo", "ground_beams: 0\n", "--ground_beams must be at least 1, got 0"),
    ("serve", "run: r\nbatch_window_ms: -1\n", "--batch_window_ms must be at least 0, got -1.0"),
])
def test_yaml_values_meet_the_declared_choices_and_minimums(tmp_path, capsys, stage, yaml_text, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert cli.main([stage, "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: {message}" in err


def test_flags_are_checked_the_same_way():
    with pytest.raises(ConfigError, match="command line: --num_beams must be at least 1, got 0"):
        parse(GenerateConfig, ["--test_data_path", "t", "--result_json_data", "r", "--num_beams", "0"])
    with pytest.raises(ConfigError, match="--test_rows must be at least 1"):
        parse(DemoConfig, ["--test_rows", "0"])
    assert parse(GenerateConfig, ["--test_data_path", "t", "--result_json_data", "r"]).limit is None  # None passes
    assert parse(BaselineConfig, ["--data", "d", "--output_dir", "o", "--epochs", "1"]).epochs == 1
    assert parse(PrepareConfig, ["--dataset", "ml-100k", "--out", "o"]).sample_rows == 5000


def test_options_that_leave_outputs_alone_are_no_part_of_stage_settings():
    from bigrec.config import stage_settings, to_dict
    from bigrec.stages.train import Config as TrainConfig

    cfg = TrainConfig(train_data_path=["t.json"], output_dir="o", report_to=["tensorboard"])
    assert to_dict(cfg)["report_to"] == ["tensorboard"] and "report_to" not in stage_settings(cfg)
    # options added later leave the settings of earlier runs alone while they hold their defaults
    later = {"snapshot_epochs", "stop_after_epoch", "layout", "timeline_overlap", "packing", "loss_chunk",
             "fused_adamw"}
    quiet = {"report_to", "trim_heap"}  # they change no output
    assert stage_settings(cfg) == {k: v for k, v in to_dict(cfg).items() if k not in quiet and k not in later}


def test_shipped_paper_config_by_name_sets_the_papers_schedule(tmp_path):
    from bigrec.config import load_yaml
    from bigrec.stages import demo

    cfg = parse(demo.Config, ["--config", "paper", "--run_dir", str(tmp_path / "run")])
    assert (cfg.sample, cfg.batch_size, cfg.learning_rate, cfg.warmup_steps, cfg.num_epochs) == (1024, 128, 1e-4, 20, 50)
    assert cfg.train_on_inputs and cfg.group_by_length and cfg.early_stopping_patience == 5
    assert parse(demo.Config, ["--config", "paper", "--num_epochs", "3"]).num_epochs == 3  # flags override it
    with pytest.raises(ConfigError, match=r"shipped configs: .*paper"):
        load_yaml("no-such-config")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_option_must_be_a_finite_number(tmp_path, capsys, value):
    """float() takes 'nan' and 'inf'; a learning rate of nan would train to nothing without a word."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--train_data_path", "x.json", f"--learning_rate={value}"])
    assert exited.value.code == 2
    assert "--learning_rate: invalid finite number value" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(f"train_data_path: x.json\nlearning_rate: {value}\n")
    assert cli.main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert str(config) in err and "learning_rate" in err and "not a finite number" in err


def test_shipped_full_data_config_is_the_demo_that_trains_every_weight_on_every_user(tmp_path):
    from bigrec.stages import demo

    cfg = parse(DemoConfig, ["--config", "full-data", "--run_dir", str(tmp_path / "run")])
    assert (cfg.layout, cfg.lora, cfg.sample, cfg.num_epochs, cfg.select_epoch) == ("timeline", False, -1, 5, True)
    assert cfg.decoding == "likelihood" and cfg.early_stopping_patience == 0
    train = demo.train_config(cfg, demo.Paths(tmp_path / "run"))  # what bigrec train runs for it
    assert (train.layout, train.lora, train.sample, train.micro_batch_size) == ("timeline", False, -1, 1)
    assert train.snapshot_epochs == [1, 2, 3, 4, 5] and train.output_dir == str(tmp_path / "run" / "model")
    assert parse(DemoConfig, ["--config", "full-data", "--lora", "true"]).lora  # flags override it
    # a user subset for a large catalogue reaches prepare, drawn with the data seed
    subset = parse(DemoConfig, ["--config", "full-data", "--users", "3000", "--data_seed", "7"])
    prep = demo.prepare_config(subset, demo.Paths(tmp_path / "run"))
    assert (prep.users, prep.seed, prep.layout, prep.out) == (3000, 7, "timeline", str(tmp_path / "run" / "data"))
    assert demo.prepare_config(cfg, demo.Paths(tmp_path / "run")).users is None
    with pytest.raises(ConfigError, match="select_epoch"):
        parse(DemoConfig, ["--config", "full-data", "--decoding", "free"])


@pytest.mark.parametrize(("name", "field", "value"), [("demo-4096", "sample", 4096), ("demo-2ep", "num_epochs", 2),
                                                      ("demo-natural", "prompt_titles", "natural")])
def test_shipped_demo_recipes_are_demo_configs_and_bench_quality_recipes(name, field, value):
    """bench_quality's recipes are the shipped demo configs: `bigrec demo --config NAME` runs the same."""
    import bench_quality

    cfg = parse(DemoConfig, ["--config", name])
    assert getattr(cfg, field) == value
    changed = {k for k, v in to_dict(cfg).items() if v != to_dict(DemoConfig())[k]}
    assert changed == {field}  # one change from the demo's defaults, nothing else
    assert bench_quality.recipe(name) == {field: value}


def test_bench_quality_refuses_an_unknown_recipe():
    import subprocess
    import sys

    from bench_quality import __file__ as script

    proc = subprocess.run([sys.executable, script, "--recipes", "demo,nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe nope: config file not found: nope" in proc.stderr
