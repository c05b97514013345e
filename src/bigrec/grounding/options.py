"""The grounding options every stage that embeds offers (index, evaluate, demo), in one place."""

from __future__ import annotations

from typing import Any

from bigrec.config import option
from bigrec.grounding.embedding import POOLINGS, REFERENCE, TITLE_TEXTS, Grounding


# The same three options on every stage that embeds (index, evaluate, demo); defaults: the reference.
def pooling_option(default: str = REFERENCE.pooling):
    return option(default, "last: hidden state at the last token (reference); mean: mean over tokens",
                  choices=POOLINGS)



def layer_option(default: int = REFERENCE.layer):
    return option(default, "hidden state to embed with: -1 = last layer (reference), N = after N layers")



def title_text_option(default: str = REFERENCE.text):
    return option(default, "bare: titles as written (reference); natural: 'Shining, The (1980)' embedded as "
                           "'The Shining (1980)'", choices=TITLE_TEXTS)



def grounding_of(config) -> Grounding:
    """The :class:`Grounding` that a stage's ``pooling``/``embed_layer``/``title_text`` options name."""
    return Grounding(config.pooling, config.embed_layer, config.title_text)



def grounding_options(grounding: Grounding) -> dict[str, Any]:
    """The options that name ``grounding``, to pass on to another stage's config (inverse of :func:`grounding_of`)."""
    return {"pooling": grounding.pooling, "embed_layer": grounding.layer, "title_text": grounding.text}
