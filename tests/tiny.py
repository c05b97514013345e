"""A tiny random causal LM of a real architecture, with a real fast tokenizer, built locally.

Tests must not download anything, yet should exercise the same code paths as a real model:
``AutoModelForCausalLM``/``AutoTokenizer`` loading from a folder, byte-level BPE, special
tokens, LoRA target modules named ``q_proj``/``v_proj``. Building one takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from bigrec.data.prompts import DOMAINS, alpaca_prompt, instruction_row

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3


def default_texts() -> list[str]:
    """Text in the shape the pipeline produces, so the BPE merges cover prompts and titles."""
    titles = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Babe (1995)", "Jumanji (1995)",
              "Sabrina (1995)", "Mortal Kombat (1995)", "Usual Suspects, The (1995)"]
    texts = []
    for domain in DOMAINS.values():
        row = instruction_row(domain, titles[:4], titles[5])
        texts.append(alpaca_prompt(row["instruction"], row["input"], row["output"]))
    return texts + titles + ["The quick brown fox jumps over the lazy dog. 0123456789"]


def build_tokenizer(texts: list[str], vocab_size: int = 400, add_bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if add_bos:  # Llama-style: BOS in front of every encoded text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def make_tiny_model(path: str | Path, arch: str = "llama", texts: list[str] | None = None, seed: int = 0) -> str:
    """Save a tiny random ``arch`` model ("llama" or "qwen2") and its tokenizer into ``path``."""
    path = Path(path)
    tokenizer = build_tokenizer(default_texts() + list(texts or []), add_bos=(arch == "llama"))
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
