"""Model shapes, sizes and the made-up rows and random-weight models every check uses."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from device import REPO
from device.measure import free_memory


def _bigrec_defaults():
    """bigrec's shared defaults (``src/bigrec/llm/defaults.py``), loaded by path: importing this module
    must not need bigrec on the import path (``use_working_tree`` reruns the script with it there)."""
    spec = importlib.util.spec_from_file_location("bigrec_defaults", REPO / "src" / "bigrec" / "llm" / "defaults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEFAULTS = _bigrec_defaults()

# name -> (architecture, config values)
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                   tie_word_embeddings=True)),
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                 tie_word_embeddings=True)),
    "llama-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                               tie_word_embeddings=False)),
}


TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512)


# Sizes: flag -> (default, with --tiny). A flag given explicitly wins over both.
SIZES: dict[str, tuple[int, int]] = {
    "steps": (10, 3), "warmup": (2, 1), "batch_size": (8, 4), "micro_batch_size": (8, 2),
    "gen_rows": (64, 8), "gen_batch": (32, 4), "embed_rows": (1024, 64), "catalog_size": (2048, 128),
    "tokenizer_vocab": (4000, 400),
}


NUM_BEAMS = DEFAULTS.NUM_BEAMS  # free beam search: bigrec generate's default


CANDIDATES, SEARCH_NODES = DEFAULTS.CANDIDATES, DEFAULTS.SEARCH_NODES  # likelihood ranking: bigrec generate's defaults


# micro-batches of the packed training sweep per shape (each fits an 80 GiB GPU without checkpointing)
SWEEPS: dict[str, tuple[int, ...]] = {"smollm2-135m": (8, 32, 128), "qwen2-0.5b": (8, 32, 64), "llama-7b": (8, 16)}


TINY_SWEEP = (2, 8)


CHECKS = ("train", "sweep", "generate", "embed", "likelihood")


PYTEST_RUNS = [["tests/test_generate.py", "tests/test_decoding.py", "tests/test_index.py"],
               ["tests/test_train.py", "-k", "lora or labelled"]]


HISTORY = 10


ACCEL_ROWS, ACCEL_GEN_ROWS = 16, 8


REAL_TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)", "Sabrina (1995)",
    "Mortal Kombat (1995)", "Usual Suspects, The (1995)", "Shining, The (1980)", "Star Wars (1977)",
    "Fargo (1996)", "Contact (1997)", "Godfather, The (1972)", "Pulp Fiction (1994)", "Titanic (1997)",
    "Scream (1996)", "Liar Liar (1997)", "Air Force One (1997)", "English Patient, The (1996)",
    "Return of the Jedi (1983)", "Independence Day (ID4) (1996)", "Raiders of the Lost Ark (1981)",
    "Silence of the Lambs, The (1991)", "Twelve Monkeys (1995)", "Rock, The (1996)", "Men in Black (1997)",
    "Schindler's List (1993)", "Braveheart (1995)", "Apollo 13 (1995)", "Forrest Gump (1994)",
    "Princess Bride, The (1987)", "Empire Strikes Back, The (1980)", "Fugitive, The (1993)",
    "Terminator 2: Judgment Day (1991)", "Back to the Future (1985)", "Dead Man Walking (1995)",
    "L.A. Confidential (1997)", "Good Will Hunting (1997)", "Jerry Maguire (1996)", "Amadeus (1984)",
]


_ADJECTIVES = ["Silent", "Last", "Broken", "Golden", "Hidden", "Dark", "Lost", "Wild", "Secret", "Red", "Cold",
               "Bright", "Long", "Little", "Final", "Strange", "Burning", "Quiet", "Electric", "Midnight"]


_NOUNS = ["River", "Kingdom", "Summer", "Garden", "Road", "Empire", "Storm", "City", "Island", "Heart",
          "Winter", "Game", "Shadow", "Mountain", "Station", "Dream", "Harbor", "Mirror", "Forest", "Letter"]


def make_titles(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct MovieLens-style titles: the real ones above, then made-up ones."""
    rng = random.Random(seed)
    titles = list(REAL_TITLES)
    seen = set(titles)
    while len(titles) < n:
        adj, noun, year = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.randint(1930, 2000)
        form = rng.randrange(4)
        title = (f"{adj} {noun} ({year})", f"{adj} {noun}, The ({year})", f"{noun} of the {adj} {rng.choice(_NOUNS)}"
                 f" ({year})", f"{adj} {noun} {rng.randint(2, 4)} ({year})")[form]
        if title not in seen:
            seen.add(title)
            titles.append(title)
    return titles[:n]


def make_rows(n: int, titles: list[str], seed: int) -> list[dict]:
    """``n`` instruction rows with ``HISTORY``-title histories, as ``bigrec prepare`` writes them."""
    from bigrec.data.prompts import DOMAINS, instruction_row

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        picks = rng.sample(titles, HISTORY + 1)
        rows.append(instruction_row(DOMAINS["movie"], picks[:-1], picks[-1]))
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return str(path)


def build_model(folder: Path, arch: str, dims: dict, tokenizer_vocab: int, device: str, seed: int = 0) -> str:
    """A random-weight model of ``arch``/``dims`` with a locally trained BPE tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from bigrec.data.prompts import alpaca_prompt
    from tiny import build_tokenizer

    titles = make_titles(400, seed=seed + 1)
    texts = [alpaca_prompt(r["instruction"], r["input"], r["output"]) for r in make_rows(200, titles, seed)]
    tokenizer = build_tokenizer(texts + titles, vocab_size=tokenizer_vocab, add_bos=(arch == "llama"))
    values = dict(dims, vocab_size=max(dims["vocab_size"], len(tokenizer)), max_position_embeddings=2048,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(**values)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # tokens the tokenizer cannot decode get logit 0, below the real ones' maximum
        model.get_output_embeddings().weight[len(tokenizer):] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    free_memory()
    return str(folder)

