"""How a title, a catalogue item's or a generation's, becomes a vector (step 2 of BIGRec).

Both sides must be embedded the same way (a :class:`Grounding`), by the same model, at the same
precision. The reference notebook's way is the default: bare title text, left padding, the last
layer's hidden state at the last token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bigrec.data.prompts import natural_title
from bigrec.llm.defaults import EMBED_BATCH_SIZE

POOLINGS = ("last", "mean")



TITLE_TEXTS = ("bare", "natural")



@dataclass(frozen=True)
class Grounding:
    """How a title (catalogue item or generation) becomes a vector; both sides must agree.

    ``pooling``: ``last`` = the hidden state at the last token (the reference), ``mean`` = the
    mean over the title's tokens. ``layer``: which hidden state, -1 = the last layer (after the
    final norm), 1..L = after that many transformer layers. ``text``: ``bare`` embeds the title
    as written, ``natural`` first puts a trailing article back in front (see
    :func:`bigrec.data.prompts.natural_title`).

    Measured on the demo's generations (``benchmarks/bench_grounding.py``): the reference's
    last-token state mostly encodes the last tokens (the year), so near-miss generations land on
    unrelated items; the mean over tokens of natural titles grounds them far better.
    """

    pooling: str = "last"
    layer: int = -1
    text: str = "bare"

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.text not in TITLE_TEXTS:
            raise ValueError(f"title text must be one of {', '.join(TITLE_TEXTS)}, got {self.text!r}")
        if self.layer == 0 or self.layer < -1:
            raise ValueError(f"layer must be -1 (the last) or a layer number from 1, got {self.layer}")

    def meta(self) -> dict[str, str]:
        return {"pooling": self.pooling, "layer": str(self.layer), "text": self.text}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> Grounding | None:
        try:
            return cls(meta["pooling"], int(meta["layer"]), meta["text"])
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        where = "last layer" if self.layer == -1 else f"layer {self.layer}"
        how = "last token" if self.pooling == "last" else "mean over tokens"
        return f"{where}, {how}, {self.text} titles"

    def texts(self, titles: list[str]) -> list[str]:
        return [natural_title(t) for t in titles] if self.text == "natural" else list(titles)



REFERENCE = Grounding()



def embed_texts(model, tokenizer, texts: list[str], batch_size: int = EMBED_BATCH_SIZE,
                grounding: Grounding = REFERENCE) -> torch.Tensor:
    """One vector per text, as ``grounding`` says -> [len(texts), D] float32.

    Left padding puts every text's last token in the last column; position ids count from
    each text's first real token, so an embedding does not depend on its batch neighbours.
    Texts are batched by length to waste little padding.
    """
    body = model.base_model  # the transformer without the LM head: no [B, T, vocab] logits
    layers = model.config.num_hidden_layers
    if grounding.layer > layers:
        raise ValueError(f"embedding layer {grounding.layer} does not exist: the model has {layers} layers")
    texts = grounding.texts(texts)
    hidden_states = grounding.layer != -1
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            picks = order[lo:lo + batch_size]
            enc = tokenizer([texts[i] for i in picks], return_tensors="pt", padding=True)
            if enc["input_ids"].shape[1] == 0:  # nothing to embed: only empty texts without BOS
                raise ValueError("cannot embed an empty text with a tokenizer that adds no BOS token")
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            result = body(input_ids=enc["input_ids"].to(model.device), attention_mask=mask.to(model.device),
                          position_ids=positions.to(model.device), output_hidden_states=hidden_states)
            states = result.hidden_states[grounding.layer] if hidden_states else result.last_hidden_state
            if grounding.pooling == "last":
                hidden = states[:, -1, :]  # [B, D]
            else:
                weights = mask.to(states.device, states.dtype).unsqueeze(-1)  # [B, T, 1]
                hidden = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
            if out is None:
                out = torch.empty(len(texts), hidden.shape[-1], dtype=torch.float32)
            out[torch.tensor(picks)] = hidden.float().cpu()
    if out is None:
        raise ValueError("no texts to embed")
    return out


class Embedder:
    """Embeds generations, each distinct text once (generations repeat a lot).

    A generation that is exactly a catalogue title takes that title's row of the index: the
    same text through the same model, so the same vector up to rounding, at no cost.
    """

    def __init__(self, model, tokenizer, batch_size: int, known: dict[str, torch.Tensor] | None = None,
                 grounding: Grounding = REFERENCE):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.grounding = grounding
        self.cache: dict[str, torch.Tensor] = dict(known or {})
        self.seconds = 0.0  # spent embedding, for the timing log

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), D]; empty texts get zero rows (the caller makes them misses)."""
        new = sorted({t for t in texts if t and t not in self.cache})
        if new:
            start = time.perf_counter()
            for text, vec in zip(new, embed_texts(self.model, self.tokenizer, new, self.batch_size,
                                                          self.grounding), strict=True):
                self.cache[text] = vec
            self.seconds += time.perf_counter() - start
        dim = self.model.config.hidden_size
        return torch.stack([self.cache[t] if t else torch.zeros(dim) for t in texts])
