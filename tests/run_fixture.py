"""A complete tiny run folder, as ``bigrec demo`` leaves one, built locally in seconds.

Layout (``run.yaml`` points at each part, paths relative to the folder):

- ``base/``: a tiny random Llama whose tokenizer was trained on these titles;
- ``data/``: ``bigrec prepare`` output of a small ml-100k-format dataset (20 movies, 12 users);
- ``adapter/``: a LoRA adapter taught two answers (see :data:`TAUGHT`), so that generation,
  grounding and ranking can be checked against known titles;
- ``index.safetensors``: the item index (``bigrec.grounding.index.ensure_index``) of the base model;
- ``sasrec/``: a small SASRec trained by ``bigrec baseline``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny_model  # noqa: E402

TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)", "Copycat (1995)",
          "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)", "Sabrina (1995)",
          "Mortal Kombat (1995)", "Usual Suspects, The (1995)", "Braveheart (1995)", "Apollo 13 (1995)",
          "Batman Forever (1995)", "Clueless (1995)", "Dead Man Walking (1995)", "Twelve Monkeys (1995)",
          "Seven (Se7en) (1995)", "Heat (1995)"]  # the last one repeats a title: two ids, one title

# history -> the answer the adapter is taught (histories end differently, answers differ)
TAUGHT = [(["Toy Story (1995)", "Heat (1995)"], "Casino (1995)"),
          (["Heat (1995)", "Babe (1995)"], "Jumanji (1995)")]


def write_raw(root: Path) -> Path:
    """ml-100k layout (``u.data``, ``u.item``): 12 users with 6 or 7 ratings each."""
    folder = root / "ml-100k"
    folder.mkdir(parents=True)
    lines = []
    for user in range(1, 13):
        for step in range(6 + user % 2):
            item = (user * 3 + step * (1 + user % 4)) % len(TITLES) + 1
            lines.append(f"{user}\t{item}\t{1 + (user + step) % 5}\t{1000 * step + user}\n")
    (folder / "u.data").write_text("".join(lines))
    (folder / "u.item").write_bytes("".join(f"{n}|{t}|01-Jan-1995||http://x|0|1\n"
                                            for n, t in enumerate(TITLES, start=1)).encode("latin-1"))
    return folder


def teach_adapter(base: str, out: Path, steps: int = 60) -> None:
    """A LoRA adapter trained (full batch, response-only loss) to answer :data:`TAUGHT`."""
    from peft import LoraConfig, get_peft_model

    from bigrec.data.prompts import DOMAINS, instruction_row, prompt_for_row
    from bigrec.llm.models import load_model

    model, tok = load_model(base, "fp32", device="cpu", for_training=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    rows = [instruction_row(DOMAINS["movie"], history, answer) for history, answer in TAUGHT]
    enc = tok([prompt_for_row(r, with_output=True) + tok.eos_token for r in rows], return_tensors="pt",
              padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for i, row in enumerate(rows):
        labels[i, : len(tok(prompt_for_row(row))["input_ids"])] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)


def build_run(root: Path, with_sasrec: bool = True) -> Path:
    """Build the run folder under ``root`` and return it."""
    from bigrec.app.run_manifest import RunManifest
    from bigrec.cli import main
    from bigrec.grounding.index import ensure_index

    run = root / "run"
    run.mkdir(parents=True)
    base = make_tiny_model(run / "base", "llama", texts=TITLES)
    raw = write_raw(root / "raw")
    if main(["prepare", "--dataset", "ml-100k", "--source", str(raw), "--out", str(run / "data")]) != 0:
        raise RuntimeError("bigrec prepare failed on the fixture data")
    teach_adapter(base, run / "adapter")
    ensure_index(base, run / "data" / "id2name.txt", run / "index.safetensors", "fp32")
    if with_sasrec:
        rc = main(["baseline", "--model", "sasrec", "--data", str(run / "data"), "--output_dir", str(run / "sasrec"),
                   "--hidden", "16", "--layers", "1", "--epochs", "3", "--patience", "3", "--threads", "1"])
        if rc != 0:
            raise RuntimeError("bigrec baseline failed on the fixture data")
    RunManifest(base_model="base", sasrec="sasrec" if with_sasrec else None, precision="fp32", num_beams=2,
                max_new_tokens=12, ci_gamma=0.5 if with_sasrec else None).save(run)
    return run


_BUILT: dict[str, Path] = {}


def tiny_run(tmp_path_factory) -> Path:
    """The run folder, built once per test session (shared by every test module)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        _BUILT[key] = build_run(tmp_path_factory.mktemp("tiny-run"))
    return _BUILT[key]
