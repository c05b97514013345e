"""Free beam search: ``num_beams`` titles per prompt, each beam stopped at the end of its title.

A small model otherwise drifts on past the title into a list of titles, which is slow and
makes the text to ground worse. The prompts' KV cache is shared by the beams
(:mod:`bigrec.llm.kv_cache`). Used by ``bigrec generate`` and by the recommender.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from bigrec.llm.defaults import LENGTH_PENALTY
from bigrec.llm.kv_cache import cache_kwarg, shared_prompt


def title_end(text: str) -> int | None:
    """Index just past the end of the title in generated ``text``, or None while it goes on.

    The title ends after the quote that closes an opening quote, before a stray closing quote
    (a beam that skipped the opening one), or at a newline after some text.
    """
    start = len(text) - len(text.lstrip())
    ends = []
    if text.startswith('"', start):
        close = text.find('"', start + 1)
        if close != -1:
            ends.append(close + 1)
    else:
        stray = text.find('"', start)
        if stray != -1:
            ends.append(stray)
    newline = text.find("\n", start)
    if newline != -1:
        ends.append(newline)
    return min(ends) if ends else None



def cut_title(text: str) -> str:
    """Generated text cut at the end of its title (unchanged if it never ended)."""
    end = title_end(text)
    return (text if end is None else text[:end]).strip()



class TitleEndCriteria(StoppingCriteria):
    """Per sequence: did the generated part (after ``prompt_len`` tokens) finish its title one
    token ago?

    Beam search asks this of every candidate, so a beam that closed its title becomes a
    finished hypothesis and its slot goes to another candidate. A tuned model follows the
    closing quote with EOS, which ends the beam by itself, scored as the reference scores it
    (EOS's log-probability and length included); this criterion only stops the beams that drift
    on past the title, one token later, rather than letting them run to ``max_new_tokens``.

    :func:`title_end` reads text, but decoding every candidate on the host each step makes a GPU
    wait for it. Its test only needs, per token, the quotes and newlines it holds and whether it
    is all whitespace (:class:`TokenMarks`), so it runs on the ids where they are. The two agree
    except where a multi-byte whitespace character is split across byte-level tokens.
    """

    def __init__(self, tokenizer, prompt_len: int):
        self.marks = TokenMarks.of(tokenizer)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        return self.marks.title_ended(input_ids[:, self.prompt_len:-1])


class TokenMarks:
    """Per vocabulary id, what :func:`title_end` looks at in the token's text (special tokens and ids
    past the tokenizer's vocabulary: nothing)."""

    _built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer):
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True) + [""]
        stripped = [t.lstrip() for t in texts]
        self.quotes = torch.tensor([t.count('"') for t in texts], dtype=torch.int32)
        self.text = torch.tensor([bool(t) for t in stripped])  # holds something other than whitespace
        self.opens = torch.tensor([t.startswith('"') for t in stripped])  # and the first of it is a quote
        self.newline = torch.tensor(["\n" in t for t in texts])
        self.newline_after_text = torch.tensor(["\n" in t for t in stripped])
        self._on: dict[torch.device, tuple] = {}

    @classmethod
    def of(cls, tokenizer) -> TokenMarks:
        """One table per tokenizer, built once (a decode of every id)."""
        size, marks = cls._built.get(tokenizer, (None, None))
        if size != len(tokenizer):
            marks = cls(tokenizer)
            cls._built[tokenizer] = (len(tokenizer), marks)
        return marks

    def on(self, device: torch.device) -> tuple:
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.quotes, self.text, self.opens, self.newline,
                                                             self.newline_after_text))
        return self._on[device]

    def title_ended(self, ids: torch.Tensor) -> torch.BoolTensor:
        """:func:`title_end` ``is not None`` for each row of generated ``ids`` [N, t], as tensors."""
        if ids.shape[1] == 0:
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        quotes, text, opens, newline, newline_after_text = self.on(ids.device)
        ids = ids.clamp(0, len(quotes) - 1)  # the last entry is the empty text
        is_text = text[ids]
        count = is_text.cumsum(1)
        first = is_text & (count == 1)  # the token where the text starts
        after = (count - is_text.long()) > 0  # text started in an earlier token
        q = quotes[ids].sum(1)
        opened = (opens[ids] & first).any(1)
        by_quote = (q >= 2) | ((q >= 1) & ~opened)
        by_newline = ((newline[ids] & after) | (newline_after_text[ids] & first)).any(1)
        return by_quote | by_newline


def generate_ids(model, tokenizer, prompts: list[str], num_beams: int, max_new_tokens: int,
                 length_penalty: float = LENGTH_PENALTY, prefill_dtype: torch.dtype | None = None,
                 stop_token_id: int | None = None) -> torch.Tensor:
    """Generated token ids [len(prompts) * num_beams, T], beams of a row together, best first.

    The prompts are encoded once and their KV cache repeated for the beams (transformers
    would copy each prompt ``num_beams`` times before the prefill, which dominates on a CPU);
    the prefix every prompt shares (the template's preamble) is encoded once for the batch.
    ``prefill_dtype``: the dtype that encoding computes in (:func:`bigrec.llm.kv_cache.shared_prompt`).
    ``stop_token_id``: a token that ends a title as EOS does (the timeline layout's separator); the
    beams then end there, not at a closing quote.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    prompt_len = enc["input_ids"].shape[1]
    with torch.inference_mode():
        extra = {}
        if prompt_len > 1:
            enc, extra[cache_kwarg(model)] = shared_prompt(model, enc, tokenizer.pad_token_id, num_beams, max_new_tokens,
                                                prefill_dtype)
        if stop_token_id is None:
            extra["stopping_criteria"] = StoppingCriteriaList([TitleEndCriteria(tokenizer, prompt_len)])
        else:
            extra["eos_token_id"] = [t for t in (stop_token_id, tokenizer.eos_token_id) if t is not None]
        out = model.generate(
            **enc, **extra, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
            max_new_tokens=max_new_tokens, length_penalty=length_penalty, pad_token_id=tokenizer.pad_token_id)
    return out[:, prompt_len:].cpu()


def generate_batch(model, tokenizer, prompts: list[str], num_beams: int, max_new_tokens: int,
                   length_penalty: float = LENGTH_PENALTY, prefill_dtype: torch.dtype | None = None,
                   stop_token_id: int | None = None) -> list[list[str]]:
    """``num_beams`` titles per prompt, each cut at the end of its title (or at ``stop_token_id``)."""
    ids = generate_ids(model, tokenizer, prompts, num_beams, max_new_tokens, length_penalty, prefill_dtype,
                       stop_token_id)
    if stop_token_id is None:
        texts = [cut_title(t) for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
    else:
        rows = [seq[:seq.index(stop_token_id)] if stop_token_id in seq else seq for seq in ids.tolist()]
        texts = [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
    return [texts[i * num_beams:(i + 1) * num_beams] for i in range(len(prompts))]
