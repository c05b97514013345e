import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import free_port

from bigrec.config import build
from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
from bigrec.llm import decoders
from bigrec.llm.decoders import ConstrainedDecoder, LikelihoodDecoder, layout_of
from bigrec.llm.generation import cut_title, generate_batch, generate_ids, title_end
from bigrec.llm.models import load_model
from bigrec.stages import generate
from bigrec.stages.generate import Config
from tiny import make_tiny_model

# history -> target; histories of different lengths so that length sorting reorders rows
CASES = [(["Heat (1995)"], "Casino (1995)"),
         (["Babe (1995)", "Jumanji (1995)", "Heat (1995)"], "Sabrina (1995)"),
         (["Toy Story (1995)", "Babe (1995)"], "Jumanji (1995)")]
DRIFT = ', "Heat (1995)"'  # taught to follow every answer: what stopping must cut off


def case_rows(repeat: int = 1) -> list[dict]:
    rows = []
    for history, target in CASES * repeat:
        row = instruction_row(DOMAINS["movie"], history, target)
        rows.append({**row, "user_id": len(rows), "row": len(rows)})
    return rows


@pytest.fixture(scope="module")
def taught_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model taught (100 steps) to answer each case's target title, then drift on."""
    model, tok = load_model(tiny_model_dir, "fp32", for_training=True)
    rows = case_rows()
    enc = tok([prompt_for_row(r, with_output=True) + DRIFT + tok.eos_token for r in rows],
              return_tensors="pt", padding=True).to(model.device)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, row in enumerate(rows):  # loss on the response only
        labels[i, : len(tok(prompt_for_row(row))["input_ids"])] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("taught")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("text, cut", [
    ('"Heat (1995)", "Casino', '"Heat (1995)"'),
    ('  "Heat (1995)"\n', '"Heat (1995)"'),
    ('Heat (1995)", "Casino', "Heat (1995)"),  # skipped the opening quote: cut before the stray one
    ("Heat (1995)\nCasino", "Heat (1995)"),
    ('"Heat (19', '"Heat (19'),  # never ended (max_new_tokens): kept whole
])
def test_cut_title(text, cut):
    assert cut_title(text) == cut


def test_title_end_waits_for_text():
    assert title_end('"Heat') is None
    assert title_end("\n") is None  # a leading newline is not the end of a title


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_title_end_criteria_reads_the_ids_as_title_end_reads_the_text(request, fixture):
    """The criterion works on token ids (on their device, no decode per step); on sequences rich in
    quotes, newlines and whitespace it answers what title_end answers on their decoded text."""
    from bigrec.llm.generation import TitleEndCriteria
    from bigrec.llm.models import load_tokenizer

    tok = load_tokenizer(request.getfixturevalue(fixture))
    marked = [i for i in range(len(tok)) if any(c in tok.decode([i]) for c in '" \n')]
    assert len(marked) > 10
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checked = ended = 0
    for width in range(0, 12):
        ids = torch.randint(0, len(tok) + 5, (200, width), generator=g)  # a few ids past the vocabulary too
        picks = torch.tensor(marked)[torch.randint(0, len(marked), (200, width), generator=g)]
        ids = torch.where(torch.rand(200, width, generator=g) < 0.6, picks, ids)
        prompt = torch.full((200, 3), tok.pad_token_id)
        seqs = torch.cat([prompt, ids, torch.zeros(200, 1, dtype=torch.long)], 1)  # the last token is not read
        got = TitleEndCriteria(tok, prompt_len=3)(seqs.to(device))
        texts = tok.batch_decode(ids.clamp(max=len(tok) - 1).masked_fill(ids >= len(tok), tok.pad_token_id),
                                 skip_special_tokens=True)
        want = torch.tensor([title_end(t) is not None for t in texts])
        assert got.device.type == device and torch.equal(got.cpu(), want), width
        checked, ended = checked + len(texts), ended + int(want.sum())
    assert 0.2 < ended / checked < 0.9  # both answers are well represented


def test_beams_stop_at_closing_quote(taught_dir):
    model, tok = load_model(taught_dir, "fp32")
    prompts = [prompt_for_row(r) for r in case_rows()]
    ids = generate_ids(model, tok, prompts, num_beams=4, max_new_tokens=40)
    assert ids.shape[0] == len(prompts) * 4
    assert ids.shape[1] < 40
    raw = tok.batch_decode(ids, skip_special_tokens=True)
    assert all("Heat" not in text for text in raw[::4])  # best beams stopped before the taught drift
    predicts = generate_batch(model, tok, prompts, num_beams=4, max_new_tokens=40)
    assert [p[0] for p in predicts] == [f'"{target}"' for _, target in CASES]
    assert all(len(p) == 4 and all(text.count('"') <= 2 and "\n" not in text for text in p) for p in predicts)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_qwen_dir"])
def test_shared_prompt_cache_gives_the_beams_of_a_plain_generate(request, fixture):
    """The prompt encoded once (its shared prefix once per batch; SharedPromptLayer: in-place writes,
    reorders of the generated part only) returns exactly what transformers returns when it encodes
    the prompt once per beam."""
    from transformers import StoppingCriteriaList

    from bigrec.llm.generation import TitleEndCriteria
    from bigrec.llm.kv_cache import SharedPromptLayer, prompt_cache

    model, tok = load_model(request.getfixturevalue(fixture), "fp32")
    prompts = [prompt_for_row(r) for r in case_rows()]
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))
    layers = prompt_cache(model, enc, 4, 12).layers
    assert all(isinstance(layer, SharedPromptLayer) for layer in layers)
    assert len({id(layer.reorders) for layer in layers}) == 1  # a step's reorder is checked once, not per layer
    hook.remove()
    assert not head_calls  # the prefill computes the cache only: no logits
    ours = generate_ids(model, tok, prompts, num_beams=4, max_new_tokens=12)
    prompt_len = enc["input_ids"].shape[1]
    with torch.inference_mode():
        plain = model.generate(**enc, num_beams=4, num_return_sequences=4, do_sample=False, max_new_tokens=12,
                               pad_token_id=tok.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([TitleEndCriteria(tok, prompt_len)]))
    assert torch.equal(ours, plain[:, prompt_len:].cpu())


def test_a_bf16_prefill_hands_an_fp32_cache_to_the_decode_steps(tiny_model_dir):
    """Autocast encodes the prompts in bf16 with the fp32 weights (held once); the decode steps then
    get an fp32 cache, and a prefill in the model's own dtype changes nothing."""
    from bigrec.llm.kv_cache import shared_prompt

    model, tok = load_model(tiny_model_dir, "fp32")
    prompts = [prompt_for_row(r) for r in case_rows()]
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        _, cache = shared_prompt(model, enc, tok.pad_token_id, 4, 12, prefill_dtype=torch.bfloat16)
        _, exact = shared_prompt(model, enc, tok.pad_token_id, 4, 12)
    for fast, full in zip(cache.layers, exact.layers, strict=True):
        assert fast.keys.dtype == fast.values.dtype == torch.float32
        assert not torch.equal(fast.keys, full.keys)  # computed in bf16, then widened
        torch.testing.assert_close(fast.keys, full.keys, atol=0.1, rtol=0.05)
    plain = generate_ids(model, tok, prompts, num_beams=4, max_new_tokens=12)
    assert torch.equal(generate_ids(model, tok, prompts, num_beams=4, max_new_tokens=12,
                                    prefill_dtype=torch.float32), plain)
    fast = generate_ids(model, tok, prompts, num_beams=4, max_new_tokens=12, prefill_dtype=torch.bfloat16)
    assert fast.shape[0] == plain.shape[0] and fast.dtype == plain.dtype


def test_common_prefix_moves_the_shared_tokens_to_the_front(tiny_model_dir):
    from bigrec.llm.kv_cache import common_prefix

    _, tok = load_model(tiny_model_dir, "fp32")
    prompts = [prompt_for_row(r) for r in case_rows()]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out, prefix = common_prefix(enc, tok.pad_token_id)
    rows = [tok(p)["input_ids"] for p in prompts]
    assert prefix > 20 and all(r[:prefix] == rows[0][:prefix] for r in rows)
    assert any(r[prefix] != rows[0][prefix] for r in rows)  # the longest shared run, no more
    width = enc["input_ids"].shape[1]
    assert out["input_ids"].shape == (3, width)
    for i, r in enumerate(rows):
        kept = out["attention_mask"][i].bool()
        assert out["input_ids"][i][kept].tolist() == r  # each prompt's tokens, in order
        assert kept[:prefix].all() and kept[width - (len(r) - prefix):].all()
        assert (out["input_ids"][i][~kept] == tok.pad_token_id).all()
        assert int(kept.sum()) == len(r)
    # Nothing to share: one row, rows that differ at once, or right padding.
    assert common_prefix(tok(prompts[:1], return_tensors="pt"), tok.pad_token_id)[1] == 0
    assert common_prefix(tok(["alpha beta", "gamma beta"], return_tensors="pt", padding=True),
                         tok.pad_token_id)[1] <= int(tok("x")["input_ids"][0] == tok.bos_token_id)
    tok.padding_side = "right"
    assert common_prefix(tok(prompts, return_tensors="pt", padding=True), tok.pad_token_id)[1] == 0
    # Identical prompts: all but the last token is shared.
    tok.padding_side = "left"
    same, n = common_prefix(tok(prompts[:1] * 2, return_tensors="pt", padding=True), tok.pad_token_id)
    assert n == len(rows[0]) - 1 and torch.equal(same["attention_mask"], torch.ones_like(same["attention_mask"]))


def test_shared_prompt_layer_matches_a_dynamic_layer_through_beam_reorders():
    from transformers.cache_utils import DynamicLayer

    from bigrec.llm.kv_cache import SharedPromptLayer

    torch.manual_seed(0)
    rows, beams, heads, prompt, dim = 3, 4, 2, 5, 8
    keys, values = torch.randn(rows, heads, prompt, dim), torch.randn(rows, heads, prompt, dim)
    shared = SharedPromptLayer(keys, values, beams, room=2)  # room for 2: the third step must grow
    plain = DynamicLayer()
    plain.update(keys.repeat_interleave(beams, 0), values.repeat_interleave(beams, 0))
    for step in range(3):
        new_k, new_v = torch.randn(rows * beams, heads, 1, dim), torch.randn(rows * beams, heads, 1, dim)
        for layer in (shared, plain):
            out_k, out_v = layer.update(new_k, new_v)
        assert torch.equal(out_k, plain.keys) and torch.equal(shared.values, plain.values)
        within = torch.cat([torch.randperm(beams) + r * beams for r in range(rows)])  # beam search's reorder
        across = torch.randperm(rows * beams)  # not beam search's: every position moves
        order = within if step < 2 else across
        shared.reorder_cache(order)
        plain.reorder_cache(order)
        assert torch.equal(shared.keys, plain.keys) and torch.equal(shared.values, plain.values), step
        assert shared.get_seq_length() == plain.get_seq_length() == prompt + step + 1
    assert shared._k.shape[2] == 2 * (prompt + 2)  # outgrown once: doubled, not grown by one token


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def config(tmp_path, model_dir, **kw) -> Config:
    values = dict(base_model=model_dir, test_data_path=str(tmp_path / "test.json"),
                  result_json_data=str(tmp_path / "out" / "test.json"), batch_size=2, num_beams=3,
                  max_new_tokens=24, precision="fp32")
    return build(Config, {**values, **kw})


def test_run_keeps_order_and_resumes(taught_dir, tmp_path, monkeypatch):
    rows = case_rows(repeat=2)
    write_rows(tmp_path / "test.json", rows)
    cfg = config(tmp_path, taught_dir)
    real = decoders.generate_batch  # what free decoding calls
    calls: list[int] = []

    def interrupted(model, tok, prompts, *args):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real(model, tok, prompts, *args)

    monkeypatch.setattr(decoders, "generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg)
    result = Path(cfg.result_json_data)
    assert not result.exists()
    [progress] = generate.progress_files(result)
    assert len(progress.read_text().splitlines()) == 1 + 2  # settings + the finished batch
    with progress.open("a") as fh:
        fh.write('{"pos": 0, "predi')  # a line cut short by the kill

    # other settings refuse the progress file rather than mixing outputs
    with pytest.raises(ValueError, match=r"other settings \(num_beams\)"):
        generate.run(config(tmp_path, taught_dir, num_beams=2))

    generated: list[str] = []

    def counting(model, tok, prompts, *args):
        generated.extend(prompts)
        return real(model, tok, prompts, *args)

    monkeypatch.setattr(decoders, "generate_batch", counting)
    generate.run(cfg)
    assert len(generated) == len(rows) - 2  # the finished rows were not generated again
    out = json.loads(result.read_text())
    assert [{k: v for k, v in r.items() if k != "predict"} for r in out] == rows
    model, tok = load_model(taught_dir, "fp32")
    for row, got in zip(rows, out, strict=True):  # each row got its own generation, not a neighbour's
        assert got["predict"] == real(model, tok, [prompt_for_row(row)], 3, 24)[0]
    assert [r["predict"][0] for r in out[:3]] == [f'"{t}"' for _, t in CASES]
    assert generate.progress_files(result) == []
    assert (result.parent / "test.config.yaml").is_file()


def test_limit_and_reference_rows(taught_dir, tmp_path):
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in case_rows(repeat=2)]
    write_rows(tmp_path / "test.json", rows)
    generate.run(config(tmp_path, taught_dir, limit=2, num_beams=2))
    out = json.loads((tmp_path / "out" / "test.json").read_text())
    assert [r["output"] for r in out] == [rows[0]["output"], rows[1]["output"]]
    assert all(len(r["predict"]) == 2 for r in out)


def test_stale_progress_is_discarded_when_asked(taught_dir, tmp_path, caplog):
    rows = case_rows()
    write_rows(tmp_path / "test.json", rows)
    cfg = config(tmp_path, taught_dir, discard_stale_progress=True)
    stale = Path(f"{cfg.result_json_data}.progress.0.jsonl")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"settings": {"num_beams": 9}}\n{"pos": 0, "predict": ["\\"Old\\""]}\n')
    with pytest.raises(ValueError, match="other settings"):
        generate.run(config(tmp_path, taught_dir))  # without the flag: refused, as before
    caplog.set_level("WARNING", logger="bigrec.stages.generate")
    generate.run(cfg)
    out = json.loads(Path(cfg.result_json_data).read_text())
    assert len(out) == len(rows) and all(r["predict"][0] != '"Old"' for r in out)
    assert "left by a run with other settings; deleted" in caplog.text


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("{}", "expected a JSON list"),
    ("[]", "no rows"),
    ('[{"instruction": "x", "input": "h"}, {"input": "y"}]', r"row 1: expected an object with an 'instruction'"),
    ('[{"instruction": "x", "input": "h"}, {"instruction": "x"}]', r"row 1: no 'input' string with the user's history"),
    ('[{"instruction": "x", "input": " \\n "}]', r"row 0: no 'input' string"),
    ("[{", "not valid JSON"),
])
def test_bad_rows(tmp_path, content, message):
    path = tmp_path / "test.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        generate.read_rows(path)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="--num_beams must be at least 1"):
        config(tmp_path, "x", num_beams=0)


def test_accelerate_two_processes_match_one(taught_dir, tmp_path):
    rows = case_rows(repeat=2)[:5]  # odd count: processes get unequal shares
    write_rows(tmp_path / "test.json", rows)
    single = config(tmp_path, taught_dir, result_json_data=str(tmp_path / "single.json"))
    generate.run(single)
    multi = tmp_path / "multi.json"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "bigrec", "generate", "--base_model", taught_dir, "--test_data_path", str(tmp_path / "test.json"),
           "--result_json_data", str(multi), "--batch_size", "2", "--num_beams", "3", "--max_new_tokens", "24",
           "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(multi.read_text()) == json.loads(Path(single.result_json_data).read_text())
    assert generate.progress_files(multi) == []


# --- constrained decoding --------------------------------------------------------------------

CATALOG = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)",
           "Sabrina (1995)", "Casino (1995)", "Mortal Kombat (1995)"]  # ids 2 and 6 share a title


def write_catalog(folder: Path) -> Path:
    path = folder / "id2name.txt"
    path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(CATALOG)))
    return path


def interrupt_after_one_batch(monkeypatch, decoder: type, cfg: Config):
    """Run ``cfg`` with ``decoder`` interrupted (Ctrl-C) on its second batch; returns the real ``__call__``."""
    real = decoder.__call__
    calls: list[int] = []

    def interrupted(self, batch_rows, prompts):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompts))
        return real(self, batch_rows, prompts)

    monkeypatch.setattr(decoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg)
    return real


def check_constrained(out: list[dict], beams: int) -> None:
    for row in out:
        assert len(row["predict"]) == len(row["predict_ids"]) == len(row["predict_scores"]) == beams
        assert row["predict_scores"] == sorted(row["predict_scores"], reverse=True)
        for text, ids in zip(row["predict"], row["predict_ids"], strict=True):
            title = text[1:-1]
            assert text == f'"{title}"' and title in CATALOG  # every beam is a quoted catalogue title
            assert ids == [i for i, t in enumerate(CATALOG) if t == title]


def test_constrained_run_writes_titles_and_ids_and_resumes(taught_dir, tmp_path, monkeypatch):
    rows = case_rows(repeat=2)
    write_rows(tmp_path / "test.json", rows)
    write_catalog(tmp_path)  # found beside the rows by default
    cfg = config(tmp_path, taught_dir, decoding="constrained")
    real = interrupt_after_one_batch(monkeypatch, ConstrainedDecoder, cfg)
    result = Path(cfg.result_json_data)
    [progress] = generate.progress_files(result)
    assert all("predict_ids" in json.loads(line) for line in progress.read_text().splitlines()[1:])
    with pytest.raises(ValueError, match=r"other settings \(.*decoding"):  # free rows do not mix in
        generate.run(config(tmp_path, taught_dir))

    generated: list[str] = []

    def counting(self, batch_rows, prompts):
        generated.extend(prompts)
        return real(self, batch_rows, prompts)

    monkeypatch.setattr(ConstrainedDecoder, "__call__", counting)
    generate.run(cfg)
    assert len(generated) == len(rows) - 2  # the finished rows were not generated again
    out = json.loads(result.read_text())
    assert [{k: v for k, v in r.items() if not k.startswith("predict")} for r in out] == rows
    check_constrained(out, 3)
    # the taught answers are among the beams (the model was taught to drift on rather than end, so its
    # end-of-sequence probabilities, which the trie forces, blur the order)
    assert all(f'"{t}"' in r["predict"] for r, (_, t) in zip(out, CASES * 2, strict=True))
    assert generate.progress_files(result) == []

    # the same rows in one go: resuming changed nothing
    generate.run(config(tmp_path, taught_dir, decoding="constrained", result_json_data=str(tmp_path / "once.json")))
    assert json.loads((tmp_path / "once.json").read_text()) == out


def test_constrained_run_with_cf_guidance(taught_dir, tmp_path):
    from bigrec.evaluation.scores import save_scores

    rows = [{**r, "item_id": CATALOG.index(t)} for r, (_, t) in zip(case_rows(), CASES, strict=True)]
    write_rows(tmp_path / "test.json", rows)
    (tmp_path / "data").mkdir()
    catalog = write_catalog(tmp_path / "data")  # not beside the rows: given by --catalog
    cf = torch.zeros(len(rows), len(CATALOG))
    cf[:, 7] = 30.0  # the CF model is sure of "Mortal Kombat", which the model was never taught
    save_scores(tmp_path / "cf.safetensors", cf, [r["row"] for r in rows], [r["item_id"] for r in rows],
                [r["user_id"] for r in rows], "test")
    cfg = config(tmp_path, taught_dir, decoding="constrained", catalog=str(catalog),
                 cf_scores=str(tmp_path / "cf.safetensors"), cf_weight=50.0, length_correction=True)
    out = json.loads(generate.run(cfg).read_text())
    check_constrained(out, 3)
    assert all(r["predict_ids"][0] == [7] for r in out)


def test_constrained_run_with_the_d3_template(tiny_qwen_dir, tmp_path):
    write_rows(tmp_path / "test.json", case_rows())
    write_catalog(tmp_path)
    cfg = config(tmp_path, tiny_qwen_dir, decoding="constrained", prompt_template="d3", category="movies",
                 num_beams=4)
    out = json.loads(generate.run(cfg).read_text())
    check_constrained(out, 4)  # D3's response ends in a newline; predict holds the quoted title


@pytest.mark.parametrize("argv, code, message", [
    (["--decoding", "beam"], 2, "invalid choice: 'beam'"),
    (["--prompt_template", "chatml"], 2, "invalid choice: 'chatml'"),
    (["--cf_scores", "x.safetensors"], 1, "only apply to --decoding constrained"),
    (["--decoding", "constrained", "--cf_weight", "1"], 1, "--cf_weight needs --cf_scores"),
    (["--prompt_template", "d3"], 1, "needs a category word"),
    (["--decoding", "constrained", "--catalog", "nowhere.txt"], 1, "catalogue not found"),
])
def test_cli_errors(tmp_path, tiny_model_dir, capsys, argv, code, message):
    from bigrec.cli import main

    write_rows(tmp_path / "test.json", case_rows())
    base = ["generate", "--base_model", tiny_model_dir, "--test_data_path", str(tmp_path / "test.json"),
            "--result_json_data", str(tmp_path / "out.json")]
    try:
        rc = main(base + argv)
    except SystemExit as exc:  # argparse refuses a value outside the choices
        rc = exc.code
    assert rc == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_config_file_values_are_checked_too(tmp_path):
    with pytest.raises(ValueError, match="--prompt_template must be one of alpaca, d3"):
        config(tmp_path, "x", prompt_template="chatml")
    with pytest.raises(ValueError, match="--decoding must be one of free, constrained, likelihood"):
        config(tmp_path, "x", decoding="greedy")


def test_help_documents_every_option():
    proc = subprocess.run([sys.executable, "-m", "bigrec", "generate", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    import dataclasses

    for field in dataclasses.fields(Config):
        assert f"--{field.name}" in text
    for phrase in ("free beam search", "constrained to catalogue titles", "{free,constrained,likelihood}", "{alpaca,d3}",
                   "length correction", "text-free assistant"):
        assert phrase in text


def test_exclude_history_never_returns_a_history_title(taught_dir, tmp_path):
    """Free decoding with --exclude_history: the taught answer, placed in the row's own history,
    is never returned (the model's top beam without the option)."""
    titles = sorted({t for history, target in CASES for t in [*history, target]})
    (tmp_path / "id2name.txt").write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(titles)))
    rows = case_rows()
    for row, (history, target) in zip(rows, CASES, strict=True):
        row["history_item_id"] = [titles.index(t) for t in history] + [titles.index(target)]
    write_rows(tmp_path / "test.json", rows)
    plain = json.loads(generate.run(config(tmp_path, taught_dir)).read_text())
    assert [r["predict"][0] for r in plain] == [f'"{target}"' for _, target in CASES]
    new = json.loads(generate.run(config(tmp_path, taught_dir, exclude_history=True,
                                         result_json_data=str(tmp_path / "new" / "test.json"))).read_text())
    for row, (history, target) in zip(new, CASES, strict=True):
        assert row["predict"], row
        assert all(p.strip('"') not in {*history, target} for p in row["predict"]), row["predict"]


# --- likelihood ranking ---------------------------------------------------------------------

def test_likelihood_run_ranks_every_title_resumes_and_evaluates(taught_dir, tmp_path, monkeypatch):
    """The taught answer ranks first in every row, each row lists every title once in score order,
    a rerun resumes, and ``bigrec evaluate`` reads the file like a constrained run."""
    from bigrec.cli import main

    rows = [{**r, "item_id": CATALOG.index(t), "history_item_id": [CATALOG.index(h) for h in hist]}
            for r, (hist, t) in zip(case_rows(repeat=2), CASES * 2, strict=True)]
    write_rows(tmp_path / "test.json", rows)
    write_catalog(tmp_path)
    cfg = config(tmp_path, taught_dir, decoding="likelihood", candidates=100)
    real = interrupt_after_one_batch(monkeypatch, LikelihoodDecoder, cfg)
    monkeypatch.setattr(LikelihoodDecoder, "__call__", real)
    out = json.loads(generate.run(cfg).read_text())
    distinct = sorted(set(CATALOG))
    for row, (_, target) in zip(out, CASES * 2, strict=True):
        assert row["predict"][0] == target  # likelihood ranking writes titles unquoted
        assert sorted(row["predict"]) == distinct and row["predict_certified"] == len(distinct)
        assert row["predict_scores"] == sorted(row["predict_scores"], reverse=True)
        assert [sorted(i) for i in row["predict_ids"]] == [[i for i, t in enumerate(CATALOG) if t == p]
                                                           for p in row["predict"]]
    once = generate.run(config(tmp_path, taught_dir, decoding="likelihood", candidates=100,
                               result_json_data=str(tmp_path / "once.json")))
    assert json.loads(once.read_text()) == out  # resuming changed nothing

    # a small cut keeps the taught answer first; the history option leaves history titles out
    cut = json.loads(generate.run(config(tmp_path, taught_dir, decoding="likelihood", candidates=2,
                                         exclude_history=True,
                                         result_json_data=str(tmp_path / "cut.json"))).read_text())
    for row, (history, target) in zip(cut, CASES * 2, strict=True):
        assert len(row["predict"]) == 2 and not set(row["predict"]) & set(history)
        assert row["predict"][0] == target
    prior = json.loads(generate.run(config(tmp_path, taught_dir, decoding="likelihood", candidates=100,
                                           prior_weight=1.0,
                                           result_json_data=str(tmp_path / "prior.json"))).read_text())
    assert [r["predict"] for r in prior] != [r["predict"] for r in out]  # the prior reorders

    rc = main(["evaluate", "--catalog", str(tmp_path / "id2name.txt"), "--input_dir", str(tmp_path / "out"),
               "--output", str(tmp_path / "metrics.json"), "--base_model", taught_dir, "--precision", "fp32"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test.json"]["NDCG"][0] == pytest.approx(1.0)  # the taught answer is every row's first item


@pytest.mark.parametrize("kw, message", [
    (dict(prior_weight=1.0), "--prior_weight applies to --decoding likelihood or constrained"),
    (dict(decoding="constrained", prior_weight=1.0, cf_scores="x.safetensors"), "give one"),
    (dict(decoding="likelihood", prior_weight=-1.0), "--prior_weight must be at least 0"),
    (dict(decoding="likelihood", length_correction=True), "apply to --decoding constrained"),
    (dict(decoding="likelihood", cf_scores="x.safetensors", cf_weight=1.0), "--cf_weight and --length_correction"),
])
def test_likelihood_options_are_checked(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, "x", **kw)


def test_likelihood_run_scores_sasrec_candidates_exactly(taught_dir, tmp_path):
    """--cf_scores with likelihood ranking: each row also holds the titles of the score file's top
    --candidates items (the history's titles passed over, as the ranking passes them over) with their
    exact log-probabilities minus the prior, and its own fields are those of a run without the file."""
    from bigrec.evaluation.scores import save_scores
    from bigrec.llm.likelihood import TitleScorer
    from bigrec.llm.trie import Trie

    rows = [{**r, "item_id": CATALOG.index(t), "history_item_id": [CATALOG.index(h) for h in hist]}
            for r, (hist, t) in zip(case_rows(), CASES, strict=True)]
    write_rows(tmp_path / "test.json", rows)
    write_catalog(tmp_path)
    cf = torch.tensor([[8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
                       [0.0, 0.0, 9.0, 0.0, 9.0, 0.0, 9.5, 0.0]])
    save_scores(tmp_path / "cf.safetensors", cf, [r["row"] for r in rows], [r["item_id"] for r in rows],
                [r["user_id"] for r in rows], "test")
    w = 0.5
    opts = dict(decoding="likelihood", candidates=2, exclude_history=True, prior_weight=w)
    out = json.loads(generate.run(config(tmp_path, taught_dir, cf_scores=str(tmp_path / "cf.safetensors"),
                                         **opts)).read_text())
    plain = json.loads(generate.run(config(tmp_path, taught_dir, result_json_data=str(tmp_path / "plain.json"),
                                           **opts)).read_text())
    assert [{k: v for k, v in r.items() if not k.startswith("cf_")} for r in out] == plain
    # by hand: row 0 (history Heat, id 1) -> ids 0, 2 (Toy Story, Casino: ids 2 and 6); row 1 (history
    # Babe, Jumanji, Heat) -> ids 7, 6 (Mortal Kombat, Casino); row 2 (Toy Story, Babe) -> 6 and 2 are one title, then 4
    assert [[sorted(ids) for ids in r["cf_ids"]] for r in out] == [[[0], [2, 6]], [[7], [2, 6]], [[2, 6], [4]]]
    model, tok = load_model(taught_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, CATALOG)
    scorer = TitleScorer(model, tok, trie)
    for row in out:
        logp = scorer.exact([prompt_for_row(row)])[0] - w * scorer.prior(layout_of(config(
            tmp_path, taught_dir, **opts)).empty_history_prompt(row))
        assert row["cf_logp"] == pytest.approx([float(logp[trie.item_leaf[ids[0]]]) for ids in row["cf_ids"]],
                                               abs=1e-4)
        for ids, score in zip(row["predict_ids"], row["predict_scores"], strict=True):  # the same scale
            if ids in row["cf_ids"]:
                assert row["cf_logp"][row["cf_ids"].index(ids)] == pytest.approx(score, abs=1e-4)


def test_constrained_run_with_the_no_history_prior(taught_dir, tmp_path):
    """--prior_weight in beam search: each returned beam's score is its log-probability plus
    w * (s(item) - max s), s the row-wise log-softmax of -log p(title | no history)."""
    from bigrec.llm.likelihood import TitleScorer
    from bigrec.llm.trie import Trie

    write_rows(tmp_path / "test.json", case_rows())
    write_catalog(tmp_path)
    w = 0.7
    cfg = config(tmp_path, taught_dir, decoding="constrained", prior_weight=w, length_penalty=0.0, num_beams=4)
    out = json.loads(generate.run(cfg).read_text())
    check_constrained(out, 4)
    model, tok = load_model(taught_dir, precision="fp32", device="cpu")
    trie = Trie.build(tok, CATALOG)
    scorer = TitleScorer(model, tok, trie)
    plain = json.loads(generate.run(config(tmp_path, taught_dir, decoding="constrained", length_penalty=0.0,
                                           num_beams=4, result_json_data=str(tmp_path / "plain.json"))).read_text())
    for row, base in zip(out, plain, strict=True):
        prior = scorer.prior(layout_of(cfg).empty_history_prompt(row))
        s = torch.log_softmax(-prior[trie.item_leaf], -1)  # over items: a shared title counts once per item
        logp = scorer.exact([prompt_for_row(row)])[0]
        for text, ids, score in zip(row["predict"], row["predict_ids"], row["predict_scores"], strict=True):
            leaf = trie.titles.index(text[1:-1])
            assert score == pytest.approx(float(logp[leaf] + w * (s[ids[0]] - s.max())), abs=2e-3)
        assert {t: sc for t, sc in zip(base["predict"], base["predict_scores"], strict=True)} != \
            {t: sc for t, sc in zip(row["predict"], row["predict_scores"], strict=True)}


# --- the model's own generation_config.json -----------------------------------------------------

SAMPLING = {"do_sample": True, "top_k": 2, "top_p": 0.5, "temperature": 0.3, "num_beams": 1,
            "num_return_sequences": 1, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_new_tokens": 8,
            "max_new_tokens": 4, "length_penalty": -2.0, "early_stopping": True, "renormalize_logits": True}


def test_a_models_sampling_config_changes_no_decoding(taught_dir, tmp_path):
    """Instruction-tuned models ship a generation_config.json asking for sampling, a few beams, penalties:
    free beam search, constrained beam search and likelihood ranking must give what they give without
    it, predictions, ids and scores alike (bigrec's own settings decide the decoding)."""
    sampling = tmp_path / "sampling-model"
    shutil.copytree(taught_dir, sampling)
    gen_config = json.loads((sampling / "generation_config.json").read_text())
    (sampling / "generation_config.json").write_text(json.dumps({**gen_config, **SAMPLING}))
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(sampling).do_sample  # the copy's config is read as written
    rows = [{**r, "item_id": CATALOG.index(t), "history_item_id": [CATALOG.index(h) for h in hist]}
            for r, (hist, t) in zip(case_rows(repeat=2), CASES * 2, strict=True)]
    write_rows(tmp_path / "test.json", rows)
    write_catalog(tmp_path)
    for decoding in ("free", "constrained", "likelihood"):
        outputs = []
        for model_dir in (taught_dir, str(sampling)):
            torch.manual_seed(0)  # were anything sampled, the seed would not make the two runs agree
            out = tmp_path / f"{decoding}-{Path(model_dir).name}.json"
            outputs.append(json.loads(generate.run(config(tmp_path, model_dir, decoding=decoding,
                                                          result_json_data=str(out))).read_text()))
        plain, sampled = outputs
        assert all(len(r["predict"]) == (3 if decoding != "likelihood" else len(set(CATALOG))) for r in plain)
        if decoding != "free":
            assert all(len(r["predict_ids"]) == len(r["predict_scores"]) == len(r["predict"]) for r in plain)
        assert sampled == plain, decoding


# --- resuming is keyed by the model's and the adapter's content -------------------------------------

def progress_positions(result: Path) -> set[int]:
    [progress] = generate.progress_files(result)
    return {json.loads(line)["pos"] for line in progress.read_text().splitlines()[1:]}


def test_an_adapter_retrained_at_the_same_path_does_not_resume_its_old_rows(tiny_model_dir, tmp_path, monkeypatch):
    """An interrupted run, then the adapter retrained in place (other weights, same path): the rerun
    refuses the old rows (with --discard_stale_progress, the demo's, it starts over) and every row is
    the new adapter's; with the adapter unchanged (even touched) the rerun resumes."""
    from bigrec.io import InputError
    from run_fixture import teach_adapter

    rows = case_rows(repeat=2)
    write_rows(tmp_path / "test.json", rows)
    adapter = tmp_path / "adapter"
    old_answers = [(h, t) for h, t in CASES]
    new_answers = [(h, CASES[(i + 1) % len(CASES)][1]) for i, (h, _) in enumerate(CASES)]
    teach_adapter(tiny_model_dir, adapter, steps=40, taught=old_answers)
    cfg = config(tmp_path, tiny_model_dir, lora_weights=str(adapter))
    old_fresh = json.loads(generate.run(config(tmp_path, tiny_model_dir, lora_weights=str(adapter),
                                               result_json_data=str(tmp_path / "old.json"))).read_text())
    real = interrupt_after_one_batch(monkeypatch, decoders.FreeDecoder, cfg)
    monkeypatch.setattr(decoders.FreeDecoder, "__call__", real)
    result = Path(cfg.result_json_data)
    finished = progress_positions(result)
    assert len(finished) == 2

    teach_adapter(tiny_model_dir, adapter, steps=40, taught=new_answers)  # retrained in place
    new_fresh = json.loads(generate.run(config(tmp_path, tiny_model_dir, lora_weights=str(adapter),
                                               result_json_data=str(tmp_path / "new.json"))).read_text())
    assert all(old_fresh[p]["predict"] != new_fresh[p]["predict"] for p in finished)  # the old rows would show
    with pytest.raises(InputError, match=r"other settings \(lora_weights\)"):
        generate.run(cfg)
    assert not result.exists() and progress_positions(result) == finished  # refused: nothing written or lost
    out = json.loads(generate.run(config(tmp_path, tiny_model_dir, lora_weights=str(adapter),
                                         discard_stale_progress=True)).read_text())
    assert out == new_fresh  # started over: no row of the old adapter

    # the same adapter, its files touched (another mtime, the same bytes): the rerun resumes
    result.unlink()
    interrupt_after_one_batch(monkeypatch, decoders.FreeDecoder, cfg)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.utime(adapter / name, ns=(1_000_000_000, 1_000_000_000))
    generated: list[str] = []

    def counting(self, batch_rows, prompts):
        generated.extend(prompts)
        return real(self, batch_rows, prompts)

    monkeypatch.setattr(decoders.FreeDecoder, "__call__", counting)
    assert json.loads(generate.run(cfg).read_text()) == new_fresh
    assert len(generated) == len(rows) - 2  # the finished rows were kept


def test_a_model_folder_rewritten_at_the_same_path_does_not_resume(tmp_path, monkeypatch):
    from bigrec.io import InputError

    base = tmp_path / "model"
    make_tiny_model(base, seed=0)
    write_rows(tmp_path / "test.json", case_rows(repeat=2))
    cfg = config(tmp_path, str(base))
    interrupt_after_one_batch(monkeypatch, decoders.FreeDecoder, cfg)
    make_tiny_model(base, seed=1)  # other weights, same folder and tokenizer
    with pytest.raises(InputError, match=r"other settings \(base_model\)"):
        generate.run(cfg)
