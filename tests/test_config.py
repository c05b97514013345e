"""Option checks declared once on the option and enforced for flags and YAML files alike."""

from __future__ import annotations

import pytest

from bigrec import cli
from bigrec.config import ConfigError, parse
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
    assert stage_settings(cfg) == {k: v for k, v in to_dict(cfg).items() if k != "report_to"}
