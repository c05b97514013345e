"""Instruction rows -> token ids and labels for supervised fine-tuning.

The prompt is exactly ``prompt_for_row(row)`` (the text generation will feed the model), the
response is the row's ``output`` followed by EOS. They are tokenised separately and joined, so
the boundary between prompt and response is the same token position for the label mask as
for generation, whatever the tokenizer merges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigrec.data.prompts import prompt_for_row
from bigrec.io import read_json

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list of instruction rows; extra keys (user_id, item_id, row, ...) are kept and ignored."""
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of instruction rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row or "output" not in row:
            raise ValueError(f"{path}: row {i} lacks 'instruction' or 'output'")
    return rows


def sample_indices(n: int, sample: int, seed: int) -> list[int]:
    """``sample`` row numbers out of ``n`` drawn with ``seed`` (all when sample is -1 or >= n), sorted."""
    if sample < 0 or sample >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=sample, replace=False).tolist())


def load_rows(paths: list[str], sample: int = -1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Concatenate the files, drawing ``sample`` rows from each; returns (rows, per-file selection)."""
    rows: list[dict] = []
    selection: list[dict] = []
    for path in paths:
        file_rows = read_rows(path)
        picked = sample_indices(len(file_rows), sample, seed)
        rows.extend(file_rows[i] for i in picked)
        # Indices only when sampled: a full file needs none (and would bloat config.yaml).
        indices = picked if len(picked) < len(file_rows) else "all"
        selection.append({"path": str(path), "rows": len(file_rows), "used": len(picked), "indices": indices})
    return rows, selection


def encode_row(row: dict, tokenizer, cutoff_len: int, train_on_inputs: bool) -> dict[str, list[int]]:
    """Token ids of prompt + response + EOS (truncated to ``cutoff_len``) and their labels."""
    prompt_ids = tokenizer(prompt_for_row(row), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(str(row["output"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + response_ids)[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


class Examples(torch.utils.data.Dataset):
    """Tokenised examples held in memory (``self.examples``: input_ids, attention_mask, labels)."""

    examples: list[dict[str, list[int]]]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


class SFTDataset(Examples):
    """Tokenised rows held in memory (a few thousand short prompts: no need for ``datasets``)."""

    def __init__(self, rows: list[dict], tokenizer, cutoff_len: int, train_on_inputs: bool, name: str = "data"):
        encoded = [encode_row(r, tokenizer, cutoff_len, train_on_inputs) for r in rows]
        # A row whose response was cut off entirely has nothing to learn and would make a 0/0 loss.
        self.examples = [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]
        dropped = len(encoded) - len(self.examples)
        if dropped:
            log.warning("%s: dropped %d of %d rows whose response lies beyond cutoff_len=%d",
                        name, dropped, len(encoded), cutoff_len)
        self.truncated = sum(1 for e in encoded if len(e["input_ids"]) == cutoff_len)


def round_up(length: int, multiple: int | None) -> int:
    """``length`` padded up to a multiple of ``multiple`` (None: as it is)."""
    return -(-length // multiple) * multiple if multiple else length


@dataclass
class Collator:
    """Right-pads a batch: pad id for inputs, 0 for the attention mask, IGNORE_INDEX for labels.

    A batch of one example is not padded: with no padding the attention needs no mask and keeps
    its causal kernel, which is what makes a micro-batch of one fast on a CPU."""

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in batch)
        length = longest if len(batch) == 1 else round_up(longest, self.pad_to_multiple_of)
        out = {"input_ids": torch.full((len(batch), length), self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(batch), length), dtype=torch.long),
               "labels": torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)}
        for i, e in enumerate(batch):  # (batch, length)
            n = len(e["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = torch.tensor(e["labels"])
        return out


@dataclass
class PackingCollator:
    """Packs a micro-batch's examples into as few rows of at most ``row_tokens`` as first-fit
    decreasing finds, instead of padding each to the longest.

    Position ids restart at every example and no attention mask is passed, so transformers keeps
    attention inside each example (it reads the packing from the position ids). Each example's
    first label is ignored, as in a padded row where no token precedes it: the loss and the number
    of loss tokens are the padded batch's. The rows' tails are padding with their own positions."""

    pad_token_id: int
    row_tokens: int
    pad_to_multiple_of: int | None = 8

    def rows(self, lengths: list[int]) -> list[list[int]]:
        """Example indices per packed row."""
        rows: list[list[int]] = []
        used: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for r, u in enumerate(used):
                if u + lengths[i] <= self.row_tokens:
                    rows[r].append(i)
                    used[r] += lengths[i]
                    break
            else:
                rows.append([i])
                used.append(lengths[i])
        return [sorted(r) for r in rows]

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in batch]
        rows = self.rows(lengths)
        length = round_up(max(sum(lengths[i] for i in row) for row in rows), self.pad_to_multiple_of)
        out = {"input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
               "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
               "position_ids": torch.zeros((len(rows), length), dtype=torch.long)}
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                out["input_ids"][r, at:at + n] = torch.tensor(batch[i]["input_ids"])
                out["labels"][r, at + 1:at + n] = torch.tensor(batch[i]["labels"][1:])
                out["position_ids"][r, at:at + n] = torch.arange(n)
                at += n
            out["position_ids"][r, at:] = torch.arange(length - at)
        return out
