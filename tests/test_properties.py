"""Hypothesis properties, each an invariant one line can state.

- NDCG/HR equal a brute-force count on random distance matrices with ties, shared titles and
  left-out items;
- a bootstrap interval contains its point estimate, and a result paired with itself differs by
  exactly 0;
- every beam of constrained decoding is a catalogue title, over random catalogues that share
  prefixes;
- ``bigrec prepare`` on truncated or byte-flipped inputs either succeeds or fails with one line
  naming the file, and never leaves a half-written output folder;
- a config value from YAML is either refused naming its key, or equals what the same text gives
  as a flag.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigrec.cli import main
from bigrec.config import ConfigError, build, parse
from bigrec.evaluation.intervals import bootstrap_ci, paired_difference
from bigrec.evaluation.metrics import ndcg_hr, target_ranks
from run_fixture import write_raw

TOPK = (1, 3, 5, 10)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def ranking_problems(draw):
    """Small integer distances (many ties), 1-3 target ids per row, an optional left-out mask."""
    rows, items = draw(st.integers(1, 12)), draw(st.integers(1, 30))
    dist = torch.tensor(draw(st.lists(st.lists(st.integers(0, 5), min_size=items, max_size=items),
                                      min_size=rows, max_size=rows)), dtype=torch.float32)
    targets = [sorted(set(draw(st.lists(st.integers(0, items - 1), min_size=1, max_size=3)))) for _ in range(rows)]
    exclude = None
    if draw(st.booleans()):
        exclude = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=items, max_size=items),
                                             min_size=rows, max_size=rows)))
        for r, ids in enumerate(targets):
            exclude[r, ids] = False  # a target is never left out (seen_mask's rule)
    return dist, targets, exclude


@FAST
@given(ranking_problems(), st.booleans())
def test_ndcg_and_hr_equal_a_brute_force_count(problem, higher_is_better):
    dist, targets, exclude = problem
    ranks = target_ranks(dist, targets, higher_is_better=higher_is_better, exclude=exclude)
    metrics = ndcg_hr(ranks, TOPK)
    ndcg, hr = [[] for _ in TOPK], [[] for _ in TOPK]
    for r, ids in enumerate(targets):  # items strictly better than the target's best id, and level with it
        values = dist[r].tolist()
        best = max(values[i] for i in ids) if higher_is_better else min(values[i] for i in ids)
        ranked = [(j, v) for j, v in enumerate(values) if not (exclude is not None and exclude[r, j])]
        better = sum(1 for _, v in ranked if (v > best if higher_is_better else v < best))
        tied = sum(1 for j, v in ranked if v == best and j not in ids)  # the title's own ids are not ties
        assert (int(ranks.better[r]), int(ranks.tied[r])) == (better, tied)
        places = range(better, better + tied + 1)  # equally likely under random tie-breaking
        for j, k in enumerate(TOPK):
            ndcg[j].append(math.fsum(1 / math.log2(p + 2) for p in places if p < k) / len(places))
            hr[j].append(sum(1 for p in places if p < k) / len(places))
    for j in range(len(TOPK)):
        assert metrics["NDCG"][j] == pytest.approx(math.fsum(ndcg[j]) / len(targets), rel=1e-12, abs=1e-15)
        assert metrics["HR"][j] == pytest.approx(math.fsum(hr[j]) / len(targets), rel=1e-12, abs=1e-15)


@FAST
@given(st.lists(st.integers(0, 60), min_size=1, max_size=200), st.integers(0, 2**31 - 1))
def test_bootstrap_interval_contains_the_estimate_and_self_difference_is_zero(rank_list, seed):
    ranks = torch.tensor(rank_list)
    metrics, ci = ndcg_hr(ranks, TOPK), bootstrap_ci(ranks, TOPK, resamples=200, seed=seed)
    for key in ("NDCG", "HR"):
        for value, (low, high) in zip(metrics[key], ci[key], strict=True):
            assert low - 1e-12 <= value <= high + 1e-12
    same = paired_difference(ranks, ranks.clone(), TOPK, resamples=200, seed=seed)
    for key in ("NDCG", "HR"):
        assert same[key]["diff"] == [0.0] * len(TOPK)
        assert same[key]["ci"] == [[0.0, 0.0]] * len(TOPK)


# --- constrained decoding -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from bigrec.llm.models import load_model

    return load_model(tiny_model_dir, precision="fp32", device="cpu")


WORDS = ["Heat", "Heat 2", "Toy", "Toy Story", "Casino", "Babe", "(1995)", "The", "Sabrina", "Story"]


@st.composite
def catalogues(draw):
    """Titles built from a few shared words, so many are prefixes of others."""
    titles = draw(st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
                           min_size=1, max_size=12))
    return titles


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(catalogues(), st.integers(1, 5))
def test_every_constrained_beam_is_a_catalogue_title(tiny_lm, titles, beams):
    from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
    from bigrec.llm.constrained import constrained_generate
    from bigrec.llm.trie import Trie

    model, tok = tiny_lm
    trie = Trie.build(tok, titles)
    prompts = [prompt_for_row(instruction_row(DOMAINS["movie"], ["Toy Story (1995)"], "Heat (1995)")),
               prompt_for_row(instruction_row(DOMAINS["movie"], ["Babe (1995)", "Heat"], "Toy"))]
    out = constrained_generate(model, tok, prompts, trie, num_beams=beams, batch_size=2)
    for row in out:
        assert 1 <= len(row) <= min(beams, len(set(titles)))
        assert len({b.title for b in row}) == len(row)
        for b in row:
            assert b.title in titles and b.item_ids == tuple(i for i, t in enumerate(titles) if t == b.title)


# --- readers on damaged files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def raw_ml100k(tmp_path_factory) -> Path:
    return write_raw(tmp_path_factory.mktemp("raw"))


def damage(data: bytes, how: str, at: float, byte: int) -> bytes:
    cut = int(at * len(data))
    if how == "truncate":
        return data[:cut]
    if how == "flip":
        return data[:cut] + bytes([data[cut] ^ (1 << (byte % 8))]) + data[cut + 1:] if data else data
    return data[:cut] + bytes([byte]) + data[cut:]  # insert


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["u.data", "u.item"]), how=st.sampled_from(["truncate", "flip", "insert"]),
       at=st.floats(0, 0.999), byte=st.integers(0, 255))
def test_prepare_on_damaged_files_succeeds_or_fails_in_one_line(raw_ml100k, tmp_path_factory, name, how, at, byte,
                                                                capsys):
    work = tmp_path_factory.mktemp("damaged")
    src = work / "ml-100k"
    src.mkdir()
    for f in raw_ml100k.iterdir():
        data = f.read_bytes()
        (src / f.name).write_bytes(damage(data, how, at, byte) if f.name == name else data)
    out = work / "out"
    code = main(["prepare", "--dataset", "ml-100k", "--source", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:
        assert (out / "train.json").is_file() and (out / "id2name.txt").is_file() and (out / "test_5000.json").is_file()
    else:
        assert code == 1 and err, "a failure must say why"
        last = err[-1]
        assert last.startswith("bigrec prepare: error: ") and "Traceback" not in "\n".join(err)
        assert name in last or "ml-100k" in last, last  # names the file (or the source holding it)
        assert not out.exists() or not any(out.iterdir()), "no half-written output folder"
    assert not [p for p in work.rglob("*") if ".staging-" in p.name or p.name.endswith(".tmp")]


# --- config values from YAML against the same text as a flag -----------------------------------

def _stage_configs():
    from bigrec.stages import baseline, evaluate, generate, train

    return [train.Config, generate.Config, baseline.Config, evaluate.Config]


BASE = {"train": {"train_data_path": ["x.json"]}, "generate": {"test_data_path": "x.json", "result_json_data": "y.json"},
        "baseline": {"data": "d", "output_dir": "o"}, "evaluate": {"catalog": "c.txt", "input_dir": "i",
                                                                   "output": "m.json"}}
TEXTS = st.one_of(st.integers(-5, 600).map(str), st.floats(-2, 2, allow_nan=False).map(lambda f: f"{f:g}"),
                  st.sampled_from(["true", "false", "none", "", "auto", "fp32", "bf16", "abc", "[a,b]", "1,2", "-1",
                                   "1e-4", "nan"]))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_yaml_values_pass_the_same_checks_as_flags(data):
    cls = data.draw(st.sampled_from(_stage_configs()))
    base = BASE[cls.__module__.rsplit(".", 1)[1]]
    field = data.draw(st.sampled_from([f for f in dataclasses.fields(cls) if f.init and f.name not in base]))
    text = data.draw(TEXTS)
    try:
        from_yaml = build(cls, {**base, field.name: text}, "test.yaml")
    except ConfigError as exc:
        assert field.name in str(exc) or "test.yaml" in str(exc)
        from_yaml = exc
    except ValueError as exc:  # a stage's validate(): a one-line message naming the option
        assert f"--{field.name}" in str(exc) or field.name in str(exc), str(exc)
        from_yaml = exc
    argv = [f"--{k}={','.join(v) if isinstance(v, list) else v}" for k, v in base.items()]
    try:
        from_flag = parse(cls, [*argv, f"--{field.name}={text}"])
    except (SystemExit, ConfigError, ValueError) as exc:
        from_flag = exc
    if isinstance(from_yaml, Exception):
        assert isinstance(from_flag, BaseException), f"YAML refused {text!r} for {field.name}, the flag took it"
    else:
        assert not isinstance(from_flag, BaseException), f"the flag refused {text!r} for {field.name}, YAML took it"
        assert getattr(from_flag, field.name) == getattr(from_yaml, field.name)
