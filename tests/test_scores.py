"""Score matrices line up with result rows by identity; mismatches are errors, never silent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigrec.evaluation.scores import load_scores, save_scores


@pytest.fixture
def saved(tmp_path):
    scores = torch.arange(12, dtype=torch.float32).view(4, 3)  # row r holds 3r, 3r+1, 3r+2
    path = tmp_path / "test.safetensors"
    save_scores(path, scores, rows=[10, 11, 12, 13], item_ids=[0, 1, 2, 0], user_ids=["u1", "u2", 7, "u4"],
                split="test_5000")
    return path


def test_align_follows_the_result_rows(saved):
    matrix = load_scores(saved)
    assert matrix.split == "test_5000" and matrix.num_items == 3
    rows = [{"row": 13, "user_id": "u4", "item_id": 0}, {"row": 11, "user_id": "u2", "item_id": 1},
            {"row": 12, "user_id": 7, "item_id": 2}]
    assert matrix.align(rows).tolist() == [[9, 10, 11], [3, 4, 5], [6, 7, 8]]
    assert matrix.align([{"row": 12, "user_id": "7", "item_id": 2}]).tolist() == [[6, 7, 8]]


@pytest.mark.parametrize("row, message", [
    ({"row": 11, "user_id": "u9", "item_id": 1}, "row 11: user"),
    ({"row": 11, "user_id": "u2", "item_id": 2}, "row 11: target item 2"),
    ({"row": 99, "user_id": "u2", "item_id": 1}, "row 99"),
    ({"user_id": "u2", "item_id": 1}, "no 'row'"),
])
def test_mismatch_names_the_row(saved, row, message):
    with pytest.raises(ValueError, match=message):
        load_scores(saved).align([row])


def test_float16_storage_and_length_check(tmp_path):
    path = tmp_path / "half.safetensors"
    save_scores(path, torch.tensor([[0.5, 1.25]]), [0], [1], [3], "test", dtype=torch.float16)
    matrix = load_scores(path)
    assert matrix.scores.dtype == torch.float16
    assert matrix.align([{"row": 0, "user_id": 3, "item_id": 1}]).dtype == torch.float32
    with pytest.raises(ValueError, match="must agree"):
        save_scores(path, torch.zeros(2, 2), [0], [1], [3], "test")


def test_npy_rows_are_split_rows(tmp_path):
    path = tmp_path / "scores.npy"
    np.save(path, np.arange(6, dtype=np.float32).reshape(3, 2))
    matrix = load_scores(path)
    assert matrix.align([{"row": 2}, {"row": 0}]).tolist() == [[4, 5], [0, 1]]
    with pytest.raises(ValueError, match="row 3 outside"):
        matrix.align([{"row": 3}])
    np.save(path, np.arange(3))
    with pytest.raises(ValueError, match="2-D"):
        load_scores(path)


def test_pickled_npy_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[{"a": 1}]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_scores(path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a bigrec score file"):
        load_scores(other)


def test_damaged_safetensors_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "test.safetensors"
    save_scores(path, torch.zeros(2, 3), [0, 1], [0, 1], ["u", "v"], "test")
    path.write_bytes(path.read_bytes()[:40])  # cut short, as a full disk or a killed copy leaves it
    with pytest.raises(ValueError, match=r"test.safetensors: not a readable safetensors score file"):
        load_scores(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors score file"):
        load_scores(path)
