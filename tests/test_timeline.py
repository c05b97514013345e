"""The timeline layout (prepare/train/generate --layout timeline) on tiny data and tiny real models."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from bigrec.cli import main
from bigrec.config import ConfigError, build, stage_settings, to_dict
from bigrec.data.catalog import read_catalog
from bigrec.data.timeline import SEP, Timeline, prompt, row_timeline, user_timelines
from bigrec.llm.layouts import get_layout
from bigrec.llm.models import load_tokenizer
from bigrec.llm.sft_data import IGNORE_INDEX
from bigrec.llm.timeline import TimelineDataset, line_counts, line_ids, load_timelines
from data_fixtures import write_ml100k_official

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)",
          "Sabrina (1995)", "Mortal Kombat (1995)", "Usual Suspects, The (1995)"]  # item n is TITLES[n - 1]
# Each user's items in time order, and their times. User 1 buys item 1 twice: at position 1 (a
# training target) and at position 7, the latest interaction of all (a test target).
SEQUENCES = {1: ([2, 1, 3, 4, 5, 6, 7, 1], [10, 20, 30, 40, 50, 60, 70, 1000]),
             2: ([3, 4, 5, 6, 7, 8, 2, 3], [11, 21, 31, 41, 51, 61, 71, 81]),
             3: ([8, 7, 6, 5, 4, 3, 2, 1], [12, 22, 32, 42, 52, 62, 72, 82]),
             4: ([5, 6, 7, 8, 1, 2], [13, 23, 33, 43, 53, 63])}
SPLITS = ("train", "valid", "test")


def write_movielens(root: Path) -> Path:
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, (items, times) in SEQUENCES.items()
                                           for i, t in zip(items, times, strict=True)))
    (folder / "u.item").write_bytes("".join(f"{n}|{t}|01-Jan-1995||http://x|0|1\n"
                                            for n, t in enumerate(TITLES, start=1)).encode("latin-1"))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """The same data prepared in both layouts: (window folder, timeline folder)."""
    root = tmp_path_factory.mktemp("timeline-data")
    source = write_movielens(root)
    outs = []
    for layout in ("window", "timeline"):
        out = root / layout
        assert main(["prepare", "--dataset", "ml-100k", "--source", str(source), "--out", str(out),
                     "--split_ratios", "0.6,0.2,0.2", "--layout", layout]) == 0
        outs.append(out)
    return outs[0], outs[1]


def rows_of(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


# --- the text ----------------------------------------------------------------------------------

def test_a_users_text_is_the_first_history_then_the_targets_up_to_the_last_training_target(prepared):
    window, timeline = prepared
    train = rows_of(timeline, "train")
    texts, disagree = user_timelines(train)
    assert disagree == 0
    catalog = read_catalog(timeline / "id2name.txt")
    by_user = {t.user: t for t in texts}
    assert sorted(by_user) == sorted(str(u) for u in {r["user_id"] for r in train})
    for user, found in by_user.items():
        mine = [r for r in train if r["user_id"] == user]
        first = [catalog.titles[i] for i in mine[0]["history_item_id"]]
        assert found.titles == first + [catalog.titles[r["item_id"]] for r in mine]
        assert found.first_target == len(first)
        assert found.item_ids == [*mine[0]["history_item_id"], *(r["item_id"] for r in mine)]
        assert found.text() == "The movies the user has watched, in order:\n" + "".join(t + "\n" for t in found.titles)
        assert found.text().startswith(prompt(mine[0]))  # the first row's prompt starts the text
    # The rows keep the window layout's ids and targets; only the text fields differ.
    for split in SPLITS:
        for w, t in zip(rows_of(window, split), rows_of(timeline, split), strict=True):
            assert {k: v for k, v in w.items() if k not in ("instruction", "input", "output")} == \
                {k: v for k, v in t.items() if k not in ("instruction", "input", "output")}
            assert w["output"] == f'"{t["output"]}"'
            assert t["input"] == "".join(catalog.titles[i] + "\n" for i in t["history_item_id"])
    for name in ("id2name.txt", "train.csv", "valid.csv", "test.csv"):
        assert (window / name).read_bytes() == (timeline / name).read_bytes()


def test_no_validation_or_test_interaction_enters_training_even_an_item_bought_again(prepared, tiny_model_dir):
    _, timeline = prepared
    rows = {split: rows_of(timeline, split) for split in SPLITS}
    # Interactions are (user, position). Splits follow each other in time and each is in time order, and
    # with min_history 1 a user's k-th row (k from 1) targets the user's position k.
    held_out, seen = set(), Counter()
    for split in SPLITS:
        for row in rows[split]:
            seen[row["user_id"]] += 1
            if split != "train":
                held_out.add((row["user_id"], seen[row["user_id"]]))
    # The case this test is about: user 1's item 1 is a training target at position 1 and a test target at 7.
    assert ("1", 7) in held_out and rows["test"][-1]["item_id"] == SEQUENCES[1][0][7] - 1
    texts, _ = load_timelines([str(timeline / "train.json")])
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    data = TimelineDataset(texts, tok, cutoff_len=512)
    for index, found in enumerate(texts):
        items = [i + 1 for i in found.item_ids]
        trained = {(found.user, p) for p in range(len(items))}
        assert not trained & held_out, found.user
        assert items == SEQUENCES[int(found.user)][0][:len(items)]  # the user's interactions from the first, in order
        assert SEQUENCES[int(found.user)][0][len(items):] == \
            [r["item_id"] + 1 for s in ("valid", "test") for r in rows[s] if r["user_id"] == found.user]
        labelled = "".join(tok.decode([t for t in e["labels"] if t != IGNORE_INDEX])
                           for e, c in zip(data.examples, data.chunks, strict=True) if c[0] == index)
        assert labelled == "".join(t + SEP for t in found.targets)  # the loss sees the training targets only
    user1 = next(t for t in texts if t.user == "1")
    assert user1.titles.count("Toy Story (1995)") == 1  # bought again in test, yet once in training


# --- chunks and labels ---------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_chunks_overlap_without_loss_and_every_target_token_gets_the_loss_once(request, fixture):
    tok = load_tokenizer(request.getfixturevalue(fixture), padding_side="right")
    long = Timeline("The movies the user has watched, in order:", [TITLES[(3 * k) % 8] for k in range(60)], 4, "a")
    short = Timeline("The movies the user has watched, in order:", TITLES[:3], 2, "b")
    cutoff, overlap = 128, 3
    data = TimelineDataset([long, short], tok, cutoff_len=cutoff, overlap=overlap)
    assert data.dropped == 0
    by_text = {0: [], 1: []}
    for example, (index, context, start, stop) in zip(data.examples, data.chunks, strict=True):
        found = [long, short][index]
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) <= cutoff and len(labels) == len(ids)
        assert context == (0 if start == found.first_target else start - overlap)
        n = sum(1 for t in labels if t == IGNORE_INDEX)
        assert all(t == IGNORE_INDEX for t in labels[:n]) and all(t != IGNORE_INDEX for t in labels[n:])
        assert ids[:n] == tok(found.header + SEP + "".join(t + SEP for t in found.titles[context:start]))["input_ids"]
        assert labels[n:] == ids[n:] == [i for t in found.titles[start:stop] for i in line_ids(tok, t)]
        by_text[index].append((start, stop, labels[n:]))
    assert len(by_text[0]) > 2 and len(by_text[1]) == 1
    for index, found in enumerate([long, short]):
        spans = by_text[index]
        assert [s for s, _, _ in spans] == [found.first_target] + [e for _, e, _ in spans[:-1]]  # no gap, no overlap
        assert spans[-1][1] == len(found.titles)
        labelled = [t for _, _, part in spans for t in part]
        head, counts = line_counts(tok, found)
        assert len(labelled) == sum(counts[found.first_target:])  # each target token once
        assert tok.decode(labelled) == "".join(t + SEP for t in found.targets)


def test_a_title_too_long_for_the_cutoff_is_dropped_not_cut(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    found = Timeline("Header:", ["Heat (1995)", "word " * 40 + "end", "Babe (1995)"], 1)
    data = TimelineDataset([found], tok, cutoff_len=20, overlap=1)
    assert data.dropped == 1
    assert [tok.decode([t for t in e["labels"] if t != IGNORE_INDEX]) for e in data.examples] == ["Babe (1995)\n"]


# --- training and generation ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(prepared, tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned whole (a tiny random model learns little through LoRA) on timelines."""
    _, timeline = prepared
    out = tmp_path_factory.mktemp("timeline-run")
    assert main(["train", "--base_model", tiny_model_dir, "--train_data_path", str(timeline / "train.json"),
                 "--val_data_path", str(timeline / "valid.json"), "--output_dir", str(out), "--layout", "timeline",
                 "--cutoff_len", "48", "--timeline_overlap", "2", "--batch_size", "4", "--micro_batch_size", "4",
                 "--num_epochs", "30", "--learning_rate", "1e-2", "--warmup_steps", "0", "--precision", "fp32",
                 "--save_steps", "1000", "--early_stopping_patience", "0", "--lora", "false"]) == 0
    return out


def test_training_with_the_timeline_layout_lowers_the_loss(trained, prepared, tiny_model_dir):
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    record = yaml.safe_load((trained / "config.yaml").read_text())
    assert record["config"]["layout"] == "timeline" and record["status"] == "done"
    texts, _ = load_timelines([str(prepared[1] / "train.json")])
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    chunks = TimelineDataset(texts, tok, cutoff_len=48, overlap=2)
    assert record["run"]["train_rows"] == len(chunks) > len(texts)  # some timelines ran past the cutoff
    assert record["run"]["data"][0]["users"] == len(texts)


def test_the_generation_prompt_is_the_training_format(prepared, tiny_model_dir, tiny_qwen_dir):
    _, timeline = prepared
    catalog = read_catalog(timeline / "id2name.txt")
    for model_dir in (tiny_model_dir, tiny_qwen_dir):
        tok = load_tokenizer(model_dir, padding_side="right")
        trie = get_layout("timeline").trie(tok, catalog.titles)
        for row in rows_of(timeline, "test") + rows_of(timeline, "valid"):
            example = TimelineDataset([row_timeline(row)], tok, cutoff_len=512).examples[0]
            n = example["labels"].count(IGNORE_INDEX)
            assert example["input_ids"][:n] == tok(prompt(row))["input_ids"]  # generation's prompt tokens
            path = trie.paths[trie.titles.index(catalog.titles[row["item_id"]])]
            assert example["labels"][n:] == path and path[-1] == trie.eos_token_id == tok("\n")["input_ids"][-1]


@pytest.mark.parametrize("decoding", ["free", "constrained"])
def test_generation_with_the_timeline_layout(trained, prepared, tmp_path, decoding):
    from bigrec.stages import generate

    _, timeline = prepared
    result = tmp_path / "out.json"
    cfg = build(generate.Config, dict(
        base_model=str(trained), test_data_path=str(timeline / "test.json"),
        result_json_data=str(result), num_beams=3, batch_size=4, max_new_tokens=16, precision="fp32",
        decoding=decoding, layout="timeline"))
    generate.run(cfg)
    rows = json.loads(result.read_text())
    catalog = read_catalog(timeline / "id2name.txt")
    assert len(rows) == len(rows_of(timeline, "test"))
    for row in rows:
        assert len(row["predict"]) == 3 and all(SEP not in p and '"' not in p for p in row["predict"])
        if decoding == "constrained":
            assert all(p in catalog.titles for p in row["predict"])  # every beam is a catalogue title
            assert row["predict_ids"] == [catalog.ids_for(p) for p in row["predict"]]
    if decoding == "free":  # the taught model writes titles, and its beams end at the separator
        assert sum(row["predict"][0] in catalog.titles for row in rows) >= len(rows) // 2, rows
        from bigrec.llm.generation import generate_ids
        from bigrec.llm.models import load_model
        from bigrec.llm.timeline import separator_id

        model, tok = load_model(str(trained), "fp32", phase="decode")
        sep = separator_id(tok)
        ids = generate_ids(model, tok, [prompt(r) for r in rows], 3, 16, stop_token_id=sep).tolist()
        for seq in ids:
            assert sep in seq and set(seq[seq.index(sep) + 1:]) <= {tok.pad_token_id}, tok.convert_ids_to_tokens(seq)


# --- the default layout is unchanged -------------------------------------------------------------

# sha256 of `prepare --dataset ml-100k --split_ratios 0.5,0.25,0.25` on data_fixtures.write_ml100k_official,
# written before the layout option existed (stats.json without its time and source, config.yaml without its paths)
BEFORE = {
    "config.yaml": "10edd2ff90229d7ec73c3d5b4e2674c1efb74ab94607351242c7552b7744b14f",
    "id2name.txt": "34e5d8e5846574c1f2fc70d8eb8ffc23b3f5e50d4b82eaf82bf62113b08c3a3e",
    "stats.json": "2e61bc021d8ebee56fb706ee623a2aec91a5d3b6351d7c20cfcf8902ac749063",
    "test.csv": "f82575c2d75f6495916da3de0d38b3415965976703f46516daa0283a1c94573c",
    "test.json": "28f468aaa7e05a5d5086033f00deb9ccb85d07b11d79df27f94a065e1363c3b6",
    "test_5000.json": "5fa328b0aac08f7eb39f503f69fb6087752bacaf54eb898c646e595b0882c07e",
    "train.csv": "9545afa4512f037aeeb94880eb183d850a192afea54c6bdafd8503b06aad7864",
    "train.json": "6f7a1c8b27f72fb1b2429eea5ef97c14d1a06f2db5ab23a73e5d85522f261568",
    "valid.csv": "164f9496d9928ab51b86abf815238f20334eeb91b14b7f1452fe6c49cc14b9b4",
    "valid.json": "1eab53ec5a9099220e04f62019078f40e8b4c2858445ffed2f95fac5d005381f",
    "valid_5000.json": "9ebdeaf97afaa6bdb07514ec3039017a68f43d93536da4748ab489176b187c56",
}


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.name == "stats.json":
        record = json.loads(data)
        del record["seconds"], record["source"]
        data = json.dumps(record, sort_keys=True).encode()
    if path.name == "config.yaml":
        record = yaml.safe_load(data)
        del record["out"], record["source"]
        data = json.dumps(record).encode()
    return hashlib.sha256(data).hexdigest()


def test_the_default_layout_writes_the_same_files_as_before(tmp_path):
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", "ml-100k", "--source", str(write_ml100k_official(tmp_path)),
                 "--out", str(out), "--split_ratios", "0.5,0.25,0.25"]) == 0
    assert {p.name: digest(p) for p in sorted(out.iterdir())} == BEFORE


def test_the_default_layout_keys_no_stage_and_resumes_older_runs(tmp_path):
    from bigrec.stages import generate, prepare, train

    for config in (prepare.Config(dataset="ml-100k", out="o"), train.Config(train_data_path=["t.json"]),
                   generate.Config(test_data_path="t.json", result_json_data="r.json")):
        assert "layout" not in stage_settings(config) and "timeline_overlap" not in stage_settings(config)
    data = tmp_path / "t.json"
    data.write_text("[]")
    cfg = generate.Config(test_data_path=str(data), result_json_data="r.json")
    assert "layout" not in generate.run_settings(cfg, data)
    assert generate.run_settings(build(generate.Config, {**to_dict(cfg), "layout": "timeline"}), data)["layout"] == \
        "timeline"
    # a train run whose recorded settings lack 'layout' resumes at the default, and only there
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    old = {k: v for k, v in to_dict(train.Config(train_data_path=["t.json"])).items()
           if k not in ("layout", "timeline_overlap")}
    (out / "config.yaml").write_text(yaml.safe_dump({"config": old}))
    train.check_resumable(out, str(out / "checkpoint-2"), train.Config(train_data_path=["t.json"]), {}, "sha")
    with pytest.raises(ConfigError, match="layout: 'window' -> 'timeline'"):
        train.check_resumable(out, str(out / "checkpoint-2"),
                              train.Config(train_data_path=["t.json"], layout="timeline"), {}, "sha")


def test_window_rows_are_refused_before_any_model_loads(prepared, tmp_path, capsys):
    window, _ = prepared
    assert main(["train", "--base_model", str(tmp_path / "no-model"), "--train_data_path", str(window / "train.json"),
                 "--output_dir", str(tmp_path / "run"), "--layout", "timeline"]) == 1
    assert "not a timeline-layout row" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["generate", "--base_model", str(tmp_path / "no-model"), "--test_data_path", str(window / "test.json"),
                 "--result_json_data", str(tmp_path / "r.json"), "--layout", "timeline"]) == 1
    assert "not a timeline-layout row" in capsys.readouterr().err
    assert main(["generate", "--test_data_path", str(window / "test.json"), "--result_json_data",
                 str(tmp_path / "r.json"), "--layout", "timeline", "--prompt_template", "d3"]) == 1
    assert "--layout timeline has its own prompt" in capsys.readouterr().err
