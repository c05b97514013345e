"""Instruction tuning on a tiny random model: masking, sampling, adapter training, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, TrainerState

from bigrec.cli import main
from bigrec.config import ConfigError, parse
from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
from bigrec.llm.labelled_logits import LabelledLogits, Workspace, chunked_cross_entropy, plain_linear_head
from bigrec.llm.models import load_model, load_tokenizer
from bigrec.llm.sft_data import IGNORE_INDEX, Collator, PackingCollator, SFTDataset, encode_row, load_rows
from bigrec.stages.train import Config, lora_config, run

TITLES = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)", "Sabrina (1995)"]


def make_rows(n: int, domain: str = "movie", offset: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        history = [TITLES[(i + offset + k) % len(TITLES)] for k in range(3)]
        row = instruction_row(DOMAINS[domain], history, TITLES[(i + offset + 4) % len(TITLES)])
        row.update(user_id=i, item_id=(i + 4) % len(TITLES), history_item_id=[0, 1, 2], row=i)  # extra keys
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def tiny_config(model_dir: str, out: Path, train: list[str], **overrides) -> Config:
    values = dict(base_model=model_dir, train_data_path=train, output_dir=str(out), batch_size=8,
                  micro_batch_size=4, num_epochs=1, learning_rate=1e-2, warmup_steps=0, cutoff_len=256,
                  precision="fp32", save_steps=2)
    values.update(overrides)
    return Config(**values)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_label_masking_is_exact(request, fixture):
    tok = load_tokenizer(request.getfixturevalue(fixture), padding_side="right")
    row = make_rows(1)[0]
    prompt_ids = tok(prompt_for_row(row))["input_ids"]
    n = len(prompt_ids)
    masked = encode_row(row, tok, cutoff_len=512, train_on_inputs=False)
    assert masked["input_ids"][:n] == prompt_ids  # the prompt generation will feed, token for token
    assert masked["labels"][:n] == [IGNORE_INDEX] * n
    assert masked["labels"][n:] == masked["input_ids"][n:]
    assert masked["labels"][-1] == tok.eos_token_id
    assert tok.decode(masked["input_ids"][n:-1]) == row["output"]
    unmasked = encode_row(row, tok, cutoff_len=512, train_on_inputs=True)
    assert unmasked["labels"] == unmasked["input_ids"] == masked["input_ids"]
    # Truncation cuts the end; a row left without any response token is dropped.
    short = encode_row(row, tok, cutoff_len=n + 1, train_on_inputs=False)
    assert len(short["input_ids"]) == n + 1 and short["labels"][-1] != IGNORE_INDEX
    assert len(SFTDataset([row], tok, cutoff_len=n, train_on_inputs=False)) == 0

    batch = Collator(tok.pad_token_id, pad_to_multiple_of=8)([masked, short])
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= len(masked["input_ids"])
    assert batch["attention_mask"][1].tolist() == [1] * (n + 1) + [0] * (length - n - 1)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * n + [short["labels"][-1]] + [IGNORE_INDEX] * (length - n - 1)
    assert (batch["input_ids"][1, n + 1:] == tok.pad_token_id).all()


def test_sample_and_concatenation_reproducible(tmp_path):
    movies = write_rows(tmp_path / "movies.json", make_rows(30))
    games = write_rows(tmp_path / "games.json", make_rows(20, "game"))
    a, sel_a = load_rows([movies, games], sample=5, seed=7)
    b, _ = load_rows([movies, games], sample=5, seed=7)
    c, _ = load_rows([movies, games], sample=5, seed=8)
    assert a == b and a != c
    assert [s["used"] for s in sel_a] == [5, 5] and [s["rows"] for s in sel_a] == [30, 20]
    assert all("movies" in r["instruction"] for r in a[:5]) and all("video games" in r["instruction"] for r in a[5:])
    assert [s["indices"] for s in sel_a] == [sorted(s["indices"]) for s in sel_a] and len(sel_a[0]["indices"]) == 5
    everything, sel_all = load_rows([movies, games], sample=-1, seed=7)
    assert len(everything) == 50 and [s["indices"] for s in sel_all] == ["all", "all"]
    assert len(load_rows([movies], sample=100, seed=0)[0]) == 30


def test_config_flags_and_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("train_data_path: [a.json, b.json]\nlora_r: 4\nmicro_batch_size: 2\n")
    config = parse(Config, ["--config", str(tmp_path / "c.yaml"), "--lora_r", "16", "--lora", "false",
                            "--lora_target_modules", "[q_proj,k_proj,v_proj]"])
    assert config.train_data_path == ["a.json", "b.json"] and config.lora_r == 16 and config.lora is False
    assert config.micro_batch_size == 2 and config.lora_target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (config.batch_size, config.learning_rate, config.cutoff_len, config.lora_alpha) == (128, 1e-4, 512, 16)
    (tmp_path / "bad.yaml").write_text("train_data_path: [a.json]\nlora_rank: 4\n")
    with pytest.raises(ConfigError, match="lora_rank"):
        parse(Config, ["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ConfigError, match="train_data_path"):
        parse(Config, [])


def loss_and_grads(model, fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss ``fn()`` returns and the gradients of ``model``'s trained weights from it."""
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same_loss_and_grads(got, expected) -> None:
    (loss, grads), (want, want_grads) = got, expected
    torch.testing.assert_close(loss, want)
    assert len(grads) == len(want_grads) > 0
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_labelled_logits_give_the_models_own_loss_and_gradients(request, fixture, train_on_inputs, chunk, lora):
    """Logits only at labelled positions, all at once or two rows at a time: the same loss and
    gradients as full logits, for a LoRA adapter and for every weight (the head tied to the embedding)."""
    model_dir = request.getfixturevalue(fixture)
    tok = load_tokenizer(model_dir, padding_side="right")
    data = SFTDataset(make_rows(3), tok, 256, train_on_inputs, "train")
    batch = Collator(tok.pad_token_id)([data[i] for i in range(3)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        model = get_peft_model(model, lora_config(Config(train_data_path=["x"], lora_target_modules=["q_proj", "v_proj"])))
    model.train(False)
    full = loss_and_grads(model, lambda: model(**batch).loss)
    labelled = LabelledLogits(model, chunk)
    assert labelled.chunk == chunk  # the probe finds these heads plain
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    positions = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def sparse():
        with labelled.positions(batch["labels"]):
            outputs = model(**inputs)
            assert outputs.logits.shape[0] == (0 if chunk else positions)  # [K, vocab], or none when chunked
            return labelled.loss(outputs, batch["labels"])

    assert_same_loss_and_grads(loss_and_grads(model, sparse), full)
    labelled.remove()
    assert model(**inputs).logits.shape[:2] == batch["input_ids"].shape  # the hook is gone


def test_chunked_loss_in_bf16_matches_autocasts_linear_and_reuses_its_buffers():
    """Under bf16 the chunked loss is as near the float32 truth as autocast's linear + float32
    cross-entropy, over chunks that do not divide the rows, and a second call allocates no new buffers."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(300, 24) * 0.3)
    hidden = torch.randn(37, 24, requires_grad=True)
    targets = torch.randint(0, 300, (37,))

    def grads(fn):
        weight.grad = hidden.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), weight.grad.clone(), hidden.grad.clone()

    def autocast_linear():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, reduction="sum") / 37

    exact = grads(lambda: F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum") / 37)
    usual = grads(autocast_linear)
    workspace = Workspace()
    chunked = grads(lambda: chunked_cross_entropy(hidden, weight, targets, 8, torch.bfloat16, workspace) / 37)
    before = {name: buffer.data_ptr() for name, buffer in workspace.buffers.items()}
    again = grads(lambda: chunked_cross_entropy(hidden, weight, targets, 8, torch.bfloat16, workspace) / 37)
    assert {name: buffer.data_ptr() for name, buffer in workspace.buffers.items()} == before
    assert set(before) == {"weight", "products", "logits", "d_weight"}
    for got, other in zip(chunked, again, strict=True):
        torch.testing.assert_close(got, other, rtol=0, atol=0)
    torch.testing.assert_close(chunked[0], usual[0], rtol=1e-6, atol=1e-6)  # the loss sums float32 logits alike
    for got, ref, truth in zip(chunked[1:], usual[1:], exact[1:], strict=True):
        assert (got - truth).norm() <= 1.5 * (ref - truth).norm()
        torch.testing.assert_close(got, ref, rtol=0.05, atol=1e-3)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, 5), exact[0] * 37)


def test_chunked_loss_only_where_the_logits_are_the_heads_plain_product(tiny_model_dir):
    """A head whose output a hook changes, or a model that soft-caps its logits after the head
    (Gemma 2), keeps the head's own path: chunk 0."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert plain_linear_head(model, model.get_output_embeddings())
    handle = model.get_output_embeddings().register_forward_hook(lambda module, args, output: output * 2)
    assert not plain_linear_head(model, model.get_output_embeddings())
    assert LabelledLogits(model, 4).chunk == 0
    handle.remove()
    for softcap, plain in ((1.0, False), (None, True)):
        torch.manual_seed(0)
        gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                               final_logit_softcapping=softcap))
        assert plain_linear_head(gemma, gemma.get_output_embeddings()) is plain


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_packed_rows_give_the_padded_batchs_losses_and_gradients(request, fixture, train_on_inputs):
    """Examples packed several to a row: each example's token log-probs, the batch loss, the loss
    token count and the gradients are the padded batch's."""
    model_dir = request.getfixturevalue(fixture)
    tok = load_tokenizer(model_dir, padding_side="right")
    rows = make_rows(6)
    rows[1]["input"] = rows[1]["input"] * 3  # lengths that pack unevenly
    examples = [SFTDataset(rows, tok, 256, train_on_inputs, "train")[i] for i in range(6)]
    lengths = [len(e["input_ids"]) for e in examples]
    packer = PackingCollator(tok.pad_token_id, row_tokens=max(lengths) + min(lengths))
    packed, padded = packer(examples), Collator(tok.pad_token_id)(examples)
    assert packed["input_ids"].shape[0] < len(examples) and "attention_mask" not in packed
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    count = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert count == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.train(False)

    def run_batch(batch):
        model.zero_grad()
        out = model(**batch, use_cache=False)  # as the trainer runs it
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    (a, a_grads), (b, b_grads) = run_batch(packed), run_batch(padded)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    for x, y in zip(a_grads, b_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    for r, row in enumerate(packer.rows(lengths)):  # each example's logits, wherever it was packed
        at = 0
        for i in row:
            torch.testing.assert_close(a.logits[r, at:at + lengths[i]], b.logits[i, :lengths[i]],
                                       rtol=1e-4, atol=1e-5)
            at += lengths[i]


def test_lora_training_changes_adapter_only(tiny_model_dir, tmp_path):
    # One movie row and one game row, four copies each: every step sees the same batch.
    movies = write_rows(tmp_path / "movies.json", make_rows(1) * 4)
    games = write_rows(tmp_path / "games.json", make_rows(1, "game") * 4)
    out = tmp_path / "run"
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    summary = run(tiny_config(tiny_model_dir, out, [movies, games], num_epochs=8, train_on_inputs=False,
                              lora_target_modules=every_linear))
    assert summary["global_step"] == 8

    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.2, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["status"] == "done" and resolved["run"]["train_rows"] == 8
    assert [d["used"] for d in resolved["run"]["data"]] == [4, 4]
    assert resolved["base_model"]["sha256"] and resolved["base_model"]["architecture"] == "LlamaForCausalLM"
    assert (out / "tokenizer.json").is_file()

    base_weights = load_file(Path(tiny_model_dir) / "model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    state = model.state_dict()
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero
    for name, value in base_weights.items():
        key = "base_model.model." + name
        lora_key = key.replace(".weight", ".base_layer.weight")
        assert torch.equal(state.get(lora_key, state.get(key)), value), name


def test_full_finetune_changes_base_weights(tiny_qwen_dir, tmp_path):
    data = write_rows(tmp_path / "d.json", make_rows(8))
    out = tmp_path / "full"
    run(tiny_config(tiny_qwen_dir, out, [data], lora=False, num_epochs=2, snapshot_epochs=[1]))
    assert not (out / "adapter_config.json").exists()
    trained = load_file(out / "model.safetensors")
    base = load_file(Path(tiny_qwen_dir) / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    # a full model's snapshot is a model folder of its own: weights, config and tokenizer
    model, tok = load_model(str(out / "snapshots" / "epoch-1"), precision="fp32", device="cpu")
    snapshot = load_file(out / "snapshots" / "epoch-1" / "model.safetensors")
    assert tok.eos_token_id is not None and any(not torch.equal(snapshot[k], trained[k]) for k in trained)


@pytest.mark.parametrize("lora", [True, False])
def test_training_on_packed_rows_learns_what_padded_rows_do(tiny_model_dir, tmp_path, lora):
    """`train --packing`: the same steps as padded batches (no dropout), so the same weights."""
    rows = make_rows(8)
    for i in (1, 4, 6):
        rows[i]["input"] = rows[i]["input"] * 2  # rows of two lengths: two short ones fill a row
    data = write_rows(tmp_path / "d.json", rows)
    trained = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        run(tiny_config(tiny_model_dir, out, [data], lora=lora, lora_dropout=0.0, max_steps=3, packing=packing,
                        cutoff_len=400))
        trained[packing] = load_file(out / ("adapter_model.safetensors" if lora else "model.safetensors"))
    for name, weights in trained[True].items():  # Adam's steps of 1e-2 dwarf the summation-order noise
        torch.testing.assert_close(weights, trained[False][name], rtol=1e-3, atol=1e-4)
    base = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert lora or any(not torch.equal(trained[True][k], base[k]) for k in base)


@pytest.mark.parametrize("lora", [True, False])
def test_unpadded_single_rows_learn_what_padded_batches_do(tiny_model_dir, tmp_path, lora):
    """Micro-batches of one unpadded row (full-data's default): the same steps as padded
    micro-batches of four, so the same weights, and the log counts the same un-padded tokens."""
    rows = make_rows(8)
    for i in (1, 4, 6):
        rows[i]["input"] = rows[i]["input"] * 2  # rows of two lengths: the batches of four are padded
    data = write_rows(tmp_path / "d.json", rows)
    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    single = Collator(tok.pad_token_id)([SFTDataset(rows[:1], tok, 400, False, "train")[0]])
    assert single["input_ids"].shape[1] % 8 and bool(single["attention_mask"].all())  # one row: no padding
    trained, losses = {}, {}
    for micro in (4, 1):
        out = tmp_path / f"micro-{micro}"
        run(tiny_config(tiny_model_dir, out, [data], lora=lora, lora_dropout=0.0, max_steps=3, micro_batch_size=micro,
                        cutoff_len=400))
        trained[micro] = load_file(out / ("adapter_model.safetensors" if lora else "model.safetensors"))
        losses[micro] = [r["loss"] for r in read_log(out) if "loss" in r]
        # the log counts the tokens through the model without their padding: three passes over the rows
        seen = [r["num_input_tokens_seen"] for r in read_log(out) if "loss" in r]
        assert seen[-1] == 3 * SFTDataset(rows, tok, 400, True, "train").num_tokens()
    torch.testing.assert_close(losses[1], losses[4], rtol=1e-4, atol=1e-5)  # every step's loss: the strict check
    # The weights after three Adam steps of 1e-2 agree to 1e-4 with the current releases and to 5e-3 at the
    # lowest versions pyproject claims (measured: Adam's normalisation amplifies rounding in near-zero
    # gradients); a missing or doubled row would move them by the size of a step.
    for name, weights in trained[1].items():
        torch.testing.assert_close(weights, trained[4][name], rtol=0.0, atol=1e-2)


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("chunk", [0, 2])
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_a_shared_prefix_run_once_gives_the_plain_loss_and_gradients(request, fixture, chunk, lora):
    """The rows' common prompt prefix through the body once, its cache repeated for the batch: the
    loss and gradients of the whole padded batch, for an adapter and for every weight."""
    from bigrec.llm.shared_prefix import shared_length, split_batch

    model_dir = request.getfixturevalue(fixture)
    tok = load_tokenizer(model_dir, padding_side="right")
    rows = make_rows(3)
    rows[1]["input"] = rows[1]["input"] * 2  # rows of two lengths: the batch is padded
    batch = Collator(tok.pad_token_id)([SFTDataset(rows, tok, 400, False, "train")[i] for i in range(3)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        model = get_peft_model(model, lora_config(Config(train_data_path=["x"], lora_target_modules=["q_proj", "v_proj"])))
    model.train(False)
    labelled = LabelledLogits(model, chunk)

    def loss(inputs):
        with labelled.positions(inputs["labels"]):
            return labelled.loss(model(**{k: v for k, v in inputs.items() if k != "labels"}), inputs["labels"])

    length = shared_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    first_label = int((batch["labels"] != IGNORE_INDEX).any(0).nonzero()[0])
    assert 16 <= length < first_label and bool((batch["input_ids"][:, :length] == batch["input_ids"][0, :length]).all())
    split = split_batch(model, batch, length)
    assert split["input_ids"].shape == (3, batch["input_ids"].shape[1] - length)
    plain = loss_and_grads(model, lambda: loss(batch))
    assert_same_loss_and_grads(loss_and_grads(model, lambda: loss(split)), plain)
    labelled.remove()


def test_what_a_shared_prefix_may_hold(tiny_model_dir):
    """Nothing for one row, rows that differ from the first token, or a loss on the prompt; never a
    padded position or the position before a label."""
    from bigrec.llm.shared_prefix import shared_length

    tok = load_tokenizer(tiny_model_dir, padding_side="right")
    collate = Collator(tok.pad_token_id)
    response_only = [SFTDataset(make_rows(2), tok, 400, False, "train")[i] for i in range(2)]
    batch = collate(response_only)
    length = shared_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert length > 0
    assert shared_length(*(batch[k][:1] for k in ("input_ids", "attention_mask", "labels"))) == 0
    assert shared_length(batch["input_ids"], batch["attention_mask"], batch["labels"], minimum=length + 1) == 0
    labels = batch["labels"].clone()
    labels[1, length - 3] = 7  # a label inside the prefix: the prefix stops before its predecessor
    assert shared_length(batch["input_ids"], batch["attention_mask"], labels) == length - 4
    mask = batch["attention_mask"].clone()
    mask[0, 20] = 0
    assert shared_length(batch["input_ids"], mask, batch["labels"]) == 20
    other = batch["input_ids"].clone()
    other[1, 0] += 1
    assert shared_length(other, batch["attention_mask"], batch["labels"]) == 0
    twins = collate([response_only[0], response_only[0]])  # the same row twice, its labels cut away
    no_labels = torch.full_like(twins["labels"], IGNORE_INDEX)
    assert shared_length(twins["input_ids"], torch.ones_like(twins["attention_mask"]), no_labels) == \
        twins["input_ids"].shape[1] - 1
    on_inputs = collate([SFTDataset(make_rows(2), tok, 400, True, "train")[i] for i in range(2)])
    assert shared_length(on_inputs["input_ids"], on_inputs["attention_mask"], on_inputs["labels"]) == 0


@pytest.mark.parametrize("lora", [True, False])
def test_training_with_a_shared_prefix_learns_what_plain_batches_do(tiny_model_dir, tmp_path, lora):
    """`train --share_prefix` (the default): the same steps as running every row whole (no dropout),
    so the same losses and weights, and the run records the prompt tokens it ran once."""
    rows = make_rows(8)
    for i in (1, 4, 6):
        rows[i]["input"] = rows[i]["input"] * 2
    data = write_rows(tmp_path / "d.json", rows)
    trained, losses, shared = {}, {}, {}
    for share in (True, False):
        out = tmp_path / f"share-{share}"
        summary = run(tiny_config(tiny_model_dir, out, [data], lora=lora, lora_dropout=0.0, max_steps=3,
                                  train_on_inputs=False, share_prefix=share, cutoff_len=400))
        trained[share] = load_file(out / ("adapter_model.safetensors" if lora else "model.safetensors"))
        losses[share] = [r["loss"] for r in read_log(out) if "loss" in r]
        shared[share] = summary["shared_prefix_tokens"]
        assert yaml.safe_load((out / "config.yaml").read_text())["result"]["shared_prefix_tokens"] == shared[share]
    assert shared[False] == 0 and shared[True] >= 16 * 3 * 2 * 3  # >= 16 tokens x 3 other rows x 2 micro-batches x 3 steps
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    for name, weights in trained[True].items():
        torch.testing.assert_close(weights, trained[False][name], rtol=0.0, atol=1e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_adamw_is_the_optimizer_train_builds(tiny_model_dir, tmp_path, fused):
    """--fused_adamw picks torch's fused AdamW kernel (the default) or its multi-tensor one."""
    from transformers import Trainer

    from bigrec.stages.train import training_arguments

    args = training_arguments(tiny_config(tiny_model_dir, tmp_path / "o", ["d.json"], fused_adamw=fused),
                              tmp_path / "o", torch.float32, has_validation=False, world=1)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused")) is fused


def test_keep_best_stops_and_saves(tiny_model_dir, tmp_path):
    from transformers import TrainerControl, TrainerState

    from bigrec.llm.training import KeepBest

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           lora_config(Config(train_data_path=["x"])))
    cb = KeepBest(str(tmp_path / "best"), patience=2)
    state, control = TrainerState(), TrainerControl()
    for step, loss in enumerate([3.0, 2.0, 2.5, 2.1], start=1):
        state.global_step = step
        assert not control.should_training_stop
        cb.on_evaluate(None, state, control, metrics={"eval_loss": loss}, model=model)
    assert control.should_training_stop and (cb.best_loss, cb.best_step) == (2.0, 2)
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"eval_loss": 2.0, "step": 2}
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()


def test_validation_keeps_best_adapter(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "d.json", make_rows(8))
    val = write_rows(tmp_path / "v.json", make_rows(4, offset=2))
    out = tmp_path / "run"
    summary = run(tiny_config(tiny_model_dir, out, [data], val_data_path=[val], num_epochs=3,
                              eval_steps=1, max_steps=3))
    evals = [r for r in read_log(out) if "eval_loss" in r]
    assert len(evals) == 3
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["best_step"] == best["step"]
    assert summary["best_eval_loss"] == pytest.approx(best["eval_loss"])
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(out / "best" / "adapter_model.safetensors").keys()
    for k, v in load_file(out / "best" / "adapter_model.safetensors").items():
        assert torch.equal(load_file(out / "adapter_model.safetensors")[k], v)


def test_resume_after_sigkill(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "d.json", make_rows(16))
    out = tmp_path / "run"
    args = ["--base_model", tiny_model_dir, "--train_data_path", data, "--output_dir", str(out),
            "--batch_size", "4", "--micro_batch_size", "4", "--num_epochs", "100", "--precision", "fp32",
            "--save_steps", "2", "--warmup_steps", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "bigrec", "train", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        # any complete checkpoint from step 4 on: at ~45 steps/s the rotation (2 kept) can delete
        # checkpoint-4 between two polls
        while not any(int(c.name.split("-")[1]) >= 4 and (c / "trainer_state.json").is_file()
                      for c in out.glob("checkpoint-*")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                    if (p / "trainer_state.json").is_file())
    assert killed_at >= 4 and (out / f"checkpoint-{killed_at}" / "optimizer.pt").is_file()

    # The same output folder again: it picks up the last complete checkpoint by itself.
    config = parse(Config, [*args, "--max_steps", str(killed_at + 2)])
    summary = run(config)
    records = read_log(out)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    resumed = records[starts[-1]]
    assert resumed["global_step"] == killed_at and resumed["resumed_from"].endswith(f"checkpoint-{killed_at}")
    steps_after = [r["step"] for r in records[starts[-1] + 1:] if "loss" in r]
    assert steps_after == [killed_at + 1, killed_at + 2]
    assert summary["global_step"] == killed_at + 2
    assert yaml.safe_load((out / "config.yaml").read_text())["run"]["resumed_from"].endswith(f"checkpoint-{killed_at}")


def test_start_from_adapter(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "d.json", make_rows(4))
    first = tmp_path / "first"
    run(tiny_config(tiny_model_dir, first, [data], max_steps=2))
    second = tmp_path / "second"
    # Learning rate 0: the adapter that comes out must be exactly the one it started from.
    run(tiny_config(tiny_model_dir, second, [data], max_steps=1, learning_rate=0.0,
                    resume_from_checkpoint=str(first)))
    log = read_log(second)
    assert log[0]["event"] == "start" and log[0]["global_step"] == 0
    assert yaml.safe_load((second / "config.yaml").read_text())["run"]["started_from_adapter"] == str(first)
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_lora_keeps_a_bf16_base_and_fp32_adapter(tiny_model_dir, tmp_path):
    """precision bf16 with LoRA: frozen base in bf16, adapter trained and saved in fp32, the cheaper dropout
    on a CPU; --attention picks the kernel."""
    from bigrec.llm.lora_dropout import BitsDropout
    from bigrec.llm.models import use_cuda
    from bigrec.stages.train import build_model

    data = write_rows(tmp_path / "d.json", make_rows(1) * 8)
    config = tiny_config(tiny_model_dir, tmp_path / "bf16", [data], precision="bf16", num_epochs=6,
                         train_on_inputs=False, lora_target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                         attention="eager")
    model, _, compute = build_model(config, tiny_model_dir, None)
    assert compute == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # the cheaper dropout is a CPU trick, switched off on a GPU
    assert any(isinstance(m, BitsDropout) for m in model.modules()) == (not use_cuda())
    run(config)
    losses = [r["loss"] for r in read_log(tmp_path / "bf16") if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses  # fp32 falls the same: 5.96 -> 5.81
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    saved = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert saved and {v.dtype for v in saved.values()} == {torch.float32}
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["run"]["compute_dtype"] == "bfloat16"


def test_resume_with_other_settings_is_refused_naming_them(tiny_model_dir, tmp_path, capsys):
    data = write_rows(tmp_path / "d.json", make_rows(16))
    other = write_rows(tmp_path / "other.json", make_rows(16, offset=3))
    out = tmp_path / "run"
    args = ["train", "--base_model", tiny_model_dir, "--train_data_path", data, "--output_dir", str(out),
            "--batch_size", "4", "--micro_batch_size", "4", "--max_steps", "2", "--precision", "fp32",
            "--save_steps", "2", "--warmup_steps", "0"]
    assert main(args) == 0 and (out / "checkpoint-2" / "trainer_state.json").is_file()
    adapter = (out / "adapter_model.safetensors").read_bytes()
    assert main([*args, "--lora_r", "4", "--learning_rate", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint-2 of a run with other settings" in err and "learning_rate: 0.0001 -> 0.5" in err
    assert "lora_r: 8 -> 4" in err and "--resume_from_checkpoint false" in err
    assert main([*args, "--train_data_path", other]) == 1 and "train_data_path" in capsys.readouterr().err
    Path(data).write_text(json.dumps(make_rows(16, offset=5)))  # the same path, other rows
    assert main(args) == 1 and "other rows (their sha256 differs)" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # nothing was overwritten
    Path(data).write_text(json.dumps(make_rows(16)))
    assert main([*args, "--max_steps", "3"]) == 0  # training longer is a resume
    assert main([*args, "--lora_r", "4", "--resume_from_checkpoint", "false"]) == 0  # starting over


def test_bad_data_fails_before_the_model_loads_and_leaves_no_folder(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "x"}]')
    out = tmp_path / "run"
    assert main(["train", "--base_model", tiny_model_dir, "--train_data_path", str(bad), "--output_dir", str(out)]) == 1
    assert "row 0 lacks 'instruction' or 'output'" in capsys.readouterr().err and not out.exists()


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_pause_and_continue_is_one_uninterrupted_run(tiny_model_dir, tmp_path):
    """--stop_after_epoch pauses a run planned over --num_epochs; continuing it gives the same
    learning rates, evaluations, snapshots and adapter as a run that never stopped."""
    data = write_rows(tmp_path / "d.json", make_rows(16))
    val = write_rows(tmp_path / "v.json", make_rows(4, offset=2))
    common = dict(val_data_path=[val], num_epochs=4, batch_size=4, micro_batch_size=4, learning_rate=5e-3,
                  warmup_steps=1, save_steps=3, snapshot_epochs=[1, 2, 4], early_stopping_patience=0)
    whole = run(tiny_config(tiny_model_dir, tmp_path / "whole", [data], **common))
    paused = run(tiny_config(tiny_model_dir, tmp_path / "parts", [data], stop_after_epoch=2, **common))
    assert paused["paused"] and paused["global_step"] == 8 and paused["max_steps"] == 16
    assert yaml.safe_load((tmp_path / "parts" / "config.yaml").read_text())["status"] == "paused"
    assert (tmp_path / "parts" / "checkpoint-8" / "trainer_state.json").is_file()  # a checkpoint at the pause
    assert not (tmp_path / "parts" / "snapshots" / "epoch-4").exists()
    rest = run(tiny_config(tiny_model_dir, tmp_path / "parts", [data], **common))
    assert not rest["paused"] and rest["global_step"] == whole["global_step"] == 16

    def steps(out: Path, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_log(out) if key in r}

    assert steps(tmp_path / "parts", "learning_rate") == pytest.approx(steps(tmp_path / "whole", "learning_rate"))
    evals = [r["step"] for r in read_log(tmp_path / "parts") if "eval_loss" in r]
    assert evals == [4, 8, 12, 16]  # each epoch end evaluated once, the pause's included
    assert steps(tmp_path / "parts", "eval_loss") == pytest.approx(steps(tmp_path / "whole", "eval_loss"), rel=1e-5)
    for folder in ("snapshots/epoch-1", "snapshots/epoch-2", "snapshots/epoch-4", "."):
        a, b = adapter(tmp_path / "whole" / folder), adapter(tmp_path / "parts" / folder)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    metas = [json.loads((tmp_path / "parts" / "snapshots" / f"epoch-{e}" / "snapshot.json").read_text())
             for e in (1, 2, 4)]
    assert [m["step"] for m in metas] == [4, 8, 16]
    assert all(m["eval_loss"] == pytest.approx(steps(tmp_path / "whole", "eval_loss")[m["step"]], rel=1e-5)
               for m in metas)
    # the clock carries over the pause: time keeps growing from one snapshot to the next
    assert 0 < metas[0]["wall_s"] < metas[1]["wall_s"] < metas[2]["wall_s"]
    assert 0 < metas[0]["cpu_s"] < metas[2]["cpu_s"] and rest["wall_s"] >= metas[2]["wall_s"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_trim_heap_hands_freed_heap_pages_back():
    """Blocks freed inside the heap stay resident until the callback trims it."""
    from bigrec.llm.training import TrimHeap

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [bytearray(b"x" * 65536) for _ in range(4096)]  # 256 MiB in heap-sized blocks, every page touched
    del blocks[::2]  # free every other one: holes inside the heap, not at its top
    before = rss_mib()
    trim = TrimHeap(every=3)
    for step in (1, 2):
        trim.on_step_end(None, TrainerState(global_step=step), None)
    assert trim.trims == 0 and before - rss_mib() < 16  # no trim yet: the holes stay resident
    trim.on_step_end(None, TrainerState(global_step=3), None)
    assert trim.trims == 1
    assert before - rss_mib() > 64  # most of the 128 MiB of holes leave the process
    del blocks
