"""A beam search's prompt KV cache, encoded once per batch and shared by every beam.

transformers encodes each prompt once per beam and grows the cache by concatenation. Here the
prompts' shared prefix (one template's preamble) is encoded once for the batch, the rest once
per row, and each full-attention layer keeps one copy of the prompt for all of a row's beams
(:class:`SharedPromptLayer`). Free decoding (``bigrec generate``) and constrained decoding
(:mod:`bigrec.llm.constrained`) both use it; likelihood ranking's search uses the layer with one
"beam" a row, for its in-place growth.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import DynamicLayer

from bigrec.llm.defaults import MAX_NEW_TOKENS


def common_prefix(enc, pad_token_id: int) -> tuple[dict, int]:
    """Left-padded prompts re-laid as ``[shared prefix][padding][rest]`` -> (encoding, prefix length).

    Prompts built from one template start with the same tokens (the instruction preamble, about
    60 of ~220 in the demo's prompts): :func:`prompt_cache` then encodes them once for the batch,
    not once per row. The prefix is the longest run of token ids every row starts with, never a
    row's last token; each row's rest stays where left padding put it, so the width is unchanged
    and ``generate``'s positions (from the mask) are each token's position in its own prompt.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    rows, width = ids.shape
    lengths = mask.sum(1)
    starts = width - lengths
    columns = torch.arange(width, device=ids.device)
    if rows < 2 or not torch.equal(mask.bool(), columns >= starts[:, None]):  # one row, or not left padded
        return enc, 0
    shortest = int(lengths.min())
    real = ids.gather(1, starts[:, None] + torch.arange(shortest - 1, device=ids.device))  # [rows, shortest - 1]
    prefix = int((real == real[:1]).all(0).long().cumprod(0).sum())
    if prefix == 0:
        return enc, 0
    gap = (columns >= prefix) & (columns < starts[:, None] + prefix)  # where each row's prefix used to be
    out = dict(enc)
    out["input_ids"] = ids.clone()
    out["input_ids"][:, :prefix] = real[0, :prefix]
    out["input_ids"][gap] = pad_token_id
    out["attention_mask"] = (~gap).to(mask.dtype)
    return out, prefix



def shared_prompt(model, enc, pad_token_id: int, num_beams: int, max_new_tokens: int,
                  prefill_dtype: torch.dtype | None = None):
    """(encoding to pass to ``generate``, its prompt cache): :func:`common_prefix`, then
    :func:`prompt_cache` on the re-laid prompts. ``generate`` must get the re-laid encoding,
    since the cache was made for its layout.

    ``prefill_dtype`` other than the model's: the prompts are encoded under autocast in that
    dtype (bf16 matrix products, the weights held once) and the cache is cast to the model's
    dtype for the decode steps.
    """
    enc, prefix = common_prefix(enc, pad_token_id)
    dtype = next(model.parameters()).dtype
    with torch.autocast(model.device.type, dtype=prefill_dtype or dtype,
                        enabled=prefill_dtype is not None and prefill_dtype != dtype):
        return enc, prompt_cache(model, enc, num_beams, max_new_tokens, prefix)



def repeated_prefix(model, rows: int, **inputs):
    """The body's KV cache of one row's prefix (``inputs``, each [1, P]) repeated for ``rows`` rows:
    tokens every row of a batch opens with run once (generation's prompts, a training batch's
    shared instruction in :mod:`bigrec.llm.shared_prefix`)."""
    out = decoder_of(model)(use_cache=True, **inputs)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


def prompt_cache(model, enc, num_beams: int, max_new_tokens: int = MAX_NEW_TOKENS, prefix_len: int = 0):
    """KV cache of the prompts without their last token, encoded once and shared by ``num_beams`` beams.

    Position ids follow the mask exactly as ``generate`` derives them, so ``generate(...,
    cache=...)`` continues with the last prompt token as if it had encoded all. With
    ``prefix_len`` (:func:`common_prefix`), the first ``prefix_len`` tokens, the same in every
    row, are encoded once for the batch. Full-attention layers become
    :class:`SharedPromptLayer`s (room for ``max_new_tokens``); other kinds (sliding windows) are
    repeated per beam as transformers does.
    """
    ids, mask = enc["input_ids"][:, :-1], enc["attention_mask"][:, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    # Only the cache is wanted: the transformer body alone, no LM head. (Even logits for one
    # position cost more than they seem: a [B, 1, D] slice times the head's [D, vocab] weight is
    # run by torch as a batched product that first copies the weight B times.)
    body = decoder_of(model)
    cache_arg = cache_kwarg(model)
    cache = None
    if prefix_len:
        cache = repeated_prefix(model, ids.shape[0], input_ids=ids[:1, :prefix_len],
                                attention_mask=mask[:1, :prefix_len], position_ids=positions[:1, :prefix_len])
    if prefix_len < ids.shape[1]:
        out = body(input_ids=ids[:, prefix_len:], attention_mask=mask, position_ids=positions[:, prefix_len:],
                   use_cache=True, **{cache_arg: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
    dtype = next(model.parameters()).dtype  # a prefill under autocast leaves bf16 keys for an fp32 decode
    layers = getattr(cache, "layers", None) or []
    for layer in layers:  # (under autocast the rotated keys come out fp32, the values bf16)
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
        cache.batch_repeat_interleave(num_beams)
        return cache
    reorders = BeamReorders(num_beams)
    cache.layers = [SharedPromptLayer(layer.keys, layer.values, num_beams, max_new_tokens + 1, reorders)
                    for layer in layers]
    return cache


class BeamReorders:
    """Whether a beam search step's reorder keeps every beam within its row, asked once per step.

    transformers hands every layer the same ``beam_idx`` tensor; the answer needs the tensor's
    values on the host, which on a GPU waits for the queued work. Asked by every layer, that wait
    came once per layer instead of once per step.
    """

    def __init__(self, beams: int):
        self.beams = beams
        self._idx: torch.Tensor | None = None  # held, so its identity cannot be reused by another tensor
        self._within = False

    def within_rows(self, beam_idx: torch.Tensor) -> bool:
        if beam_idx is not self._idx:
            rows = torch.arange(beam_idx.numel(), device=beam_idx.device) // self.beams
            self._idx, self._within = beam_idx, bool((beam_idx // self.beams == rows).all())
        return self._within



class SharedPromptLayer(DynamicLayer):
    """One attention layer's cache for beam search over prompts that every beam of a row shares.

    transformers' dynamic cache grows by concatenation (a copy of the whole cache per token)
    and beam search reorders it with ``index_select`` (another copy), so on a CPU a 200-token
    prompt makes these copies cost more than the model. Here keys and values live in one
    buffer with room for the generated tokens, written in place; and since beam search only
    moves beams within their row, whose prompt part is identical, a reorder copies only the
    generated part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, beams: int, room: int,
                 reorders: BeamReorders | None = None):
        super().__init__()
        self.reorders = reorders or BeamReorders(beams)  # shared by a cache's layers
        rows, heads, prompt, dim = keys.shape
        self.beams, self.prompt_len, self.length = beams, prompt, prompt
        self._k = keys.new_empty(rows * beams, heads, prompt + room, dim)
        self._v = values.new_empty(rows * beams, values.shape[1], prompt + room, values.shape[-1])
        self._k[:, :, :prompt] = keys.repeat_interleave(beams, dim=0)
        self._v[:, :, :prompt] = values.repeat_interleave(beams, dim=0)
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:  # more tokens than planned: double (likelihood ranking's longer searches)
            grow = max(end, 2 * self._k.shape[2]) - self._k.shape[2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[-1])], 2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[-1])], 2)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        idx = beam_idx.to(self._k.device)
        start = self.prompt_len if self.reorders.within_rows(beam_idx) else 0  # within rows: prompts equal
        if self.length > start:
            self._k[:, :, start:self.length] = self._k[idx, :, start:self.length]
            self._v[:, :, start:self.length] = self._v[idx, :, start:self.length]
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the number of tokens to remove as a negative integer")
        self.length = max(self.prompt_len, self.length + tokens_to_remove)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a SharedPromptLayer is already repeated for its beams")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a SharedPromptLayer keeps every beam of its rows")


def cache_kwarg(model) -> str:
    """The name under which this transformers takes a KV cache, in the model's forward and in
    ``generate``: ``cache`` from 5.24, ``past_key_values`` before (still an alias for a while)."""
    return "cache" if "cache" in inspect.signature(decoder_of(model).forward).parameters else "past_key_values"


def decoder_of(model):
    """The transformer body of a causal LM (no LM head), or the model itself where it has none."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    return body if isinstance(body, torch.nn.Module) else model
