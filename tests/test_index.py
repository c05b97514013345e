import json

import pytest
import torch

import bigrec.llm.models
from bigrec.cli import main
from bigrec.grounding.embedding import Grounding, embed_texts
from bigrec.grounding.index import IndexMismatchError, ensure_index, load_index
from bigrec.llm.models import load_model

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
        full = model(**tok(["Heat (1995)"], return_tensors="pt").to(model.device), output_hidden_states=True)
    torch.testing.assert_close(alone[0], full.hidden_states[-1][0, -1].cpu())
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
    assert meta["dtype"] == "float32" and (meta["pooling"], meta["layer"], meta["text"]) == ("last", "-1", "bare")
    assert json.loads(meta["model_fingerprint"])["sha256"]

    def no_load(*args, **kwargs):
        raise AssertionError("a matching index must be reused, not recomputed")

    monkeypatch.setattr(bigrec.llm.models, "load_model", no_load)
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


def test_mean_pooling_of_a_middle_layer(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "fp32")
    grounding = Grounding("mean", 1, "bare")
    alone = embed_texts(model, tok, ["Heat (1995)"], grounding=grounding)
    with torch.inference_mode():
        full = model(**tok(["Heat (1995)"], return_tensors="pt").to(model.device), output_hidden_states=True)
    torch.testing.assert_close(alone[0], full.hidden_states[1][0].mean(0).cpu())
    batch = embed_texts(model, tok, ["Usual Suspects, The (1995)", "Heat (1995)"], grounding=grounding)
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=1e-5)  # padding is left out of the mean
    with pytest.raises(ValueError, match="layer 99 does not exist"):
        embed_texts(model, tok, ["Heat (1995)"], grounding=Grounding("mean", 99))


def test_natural_titles_embed_a_trailing_article_in_front(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "fp32")
    natural = Grounding("last", -1, "natural")
    moved, written = embed_texts(model, tok, ["Usual Suspects, The (1995)", "The Usual Suspects (1995)"],
                                 grounding=natural)
    torch.testing.assert_close(moved, written)  # a generation in natural order finds the catalogue's title
    bare = embed_texts(model, tok, ["Usual Suspects, The (1995)", "The Usual Suspects (1995)"])
    assert not torch.allclose(bare[0], bare[1])


@pytest.mark.parametrize("bad", [dict(pooling="max"), dict(text="lower"), dict(layer=0), dict(layer=-2)])
def test_bad_grounding(bad):
    with pytest.raises(ValueError):
        Grounding(**bad)


def test_index_with_another_grounding_is_refused(tiny_model_dir, catalog, tmp_path):
    path = tmp_path / "index.safetensors"
    mean = Grounding("mean", 1, "natural")
    built = ensure_index(tiny_model_dir, catalog, path, "fp32", grounding=mean)
    assert torch.equal(built, ensure_index(tiny_model_dir, catalog, path, "fp32", grounding=mean))
    with pytest.raises(IndexMismatchError, match="embedded with layer 1, mean over tokens, natural titles, but this "
                                                 "run grounds with last layer, last token, bare titles"):
        ensure_index(tiny_model_dir, catalog, path, "fp32")


def test_cli_index_grounding_options(tiny_model_dir, catalog, tmp_path):
    out = tmp_path / "items.safetensors"
    assert main(["index", "--base_model", tiny_model_dir, "--catalog", str(catalog), "--output", str(out),
                 "--precision", "fp32", "--pooling", "mean", "--embed_layer", "2", "--title_text", "natural"]) == 0
    meta = load_index(out)[1]
    assert (meta["pooling"], meta["layer"], meta["text"]) == ("mean", "2", "natural")
