import json

import pytest
import torch

import bigrec.models
from bigrec.cli import main
from bigrec.index import IndexMismatchError, embed_texts, ensure_index, load_index
from bigrec.models import load_model

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Toy Story (1995)", "Usual Suspects, The (1995)"]


@pytest.fixture
def catalog(tmp_path):
    path = tmp_path / "id2name.txt"
    path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(TITLES)))
    return path


def test_embedding_is_last_token_of_last_layer_and_batch_independent(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "fp32")
    alone = embed_texts(model, tok, ["Heat (1995)"])
    with torch.inference_mode():
        full = model(**tok(["Heat (1995)"], return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(alone[0], full.hidden_states[-1][0, -1])
    batch = embed_texts(model, tok, ["Usual Suspects, The (1995)", "Heat (1995)", "Babe"], batch_size=3)
    assert batch.shape == (3, model.config.hidden_size) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)  # left padding changes nothing
    assert not torch.allclose(batch[0], batch[1])


def test_index_is_built_then_reused(tiny_model_dir, catalog, tmp_path, monkeypatch):
    path = tmp_path / "index.safetensors"
    first = ensure_index(tiny_model_dir, catalog, path, "fp32", batch_size=2)
    assert first.shape[0] == len(TITLES)
    torch.testing.assert_close(first[0], first[3])  # duplicate titles, same embedding
    _, meta = load_index(path)
    assert meta["dtype"] == "float32" and meta["pooling"] == "last_layer_last_token"
    assert json.loads(meta["model_fingerprint"])["sha256"]

    def no_load(*args, **kwargs):
        raise AssertionError("a matching index must be reused, not recomputed")

    monkeypatch.setattr(bigrec.models, "load_model", no_load)
    mtime = path.stat().st_mtime_ns
    again = ensure_index(tiny_model_dir, catalog, path, "fp32")
    assert torch.equal(first, again) and path.stat().st_mtime_ns == mtime


def test_index_of_another_model_catalogue_or_precision_is_refused(tiny_model_dir, tiny_qwen_dir, catalog, tmp_path):
    path = tmp_path / "index.safetensors"
    ensure_index(tiny_model_dir, catalog, path, "fp32")
    with pytest.raises(IndexMismatchError, match="made by another base model"):
        ensure_index(tiny_qwen_dir, catalog, path, "fp32")
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(TITLES[:-1])))
    with pytest.raises(IndexMismatchError, match="made for another catalogue"):
        ensure_index(tiny_model_dir, other, path, "fp32")
    with pytest.raises(IndexMismatchError, match="embedded in float32, but this run uses bfloat16"):
        ensure_index(tiny_model_dir, catalog, path, "bf16")
    rebuilt = ensure_index(tiny_qwen_dir, catalog, path, "fp32", overwrite=True)
    assert torch.equal(rebuilt, load_index(path)[0])


def test_not_an_index(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(IndexMismatchError, match="bad.safetensors"):
        load_index(bad)


def test_cli_index(tiny_model_dir, catalog, tmp_path, capsys):
    out = tmp_path / "idx" / "items.safetensors"
    argv = ["index", "--base_model", tiny_model_dir, "--catalog", str(catalog), "--output", str(out),
            "--precision", "fp32"]
    assert main(argv) == 0
    assert load_index(out)[0].shape[0] == len(TITLES)
    assert (out.parent / "items.config.yaml").is_file()
    assert main(argv[:-1] + ["bf16"]) == 1  # mismatch: a clear error, not a traceback
    assert "embedded in float32" in capsys.readouterr().err
