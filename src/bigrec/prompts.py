"""Prompt text, in one place for training, generation and serving.

The instruction rows follow the reference BIGRec notebooks word for word, so that models
trained with the reference scripts see the same prompts. The reference training script ends
the Alpaca preamble with "request. " and its inference script with "request.  "; here one
template serves both.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. "
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
)


@dataclass(frozen=True)
class Domain:
    """How one item domain is worded in the instruction rows."""

    plural: str  # "movies"
    singular: str  # "movie"
    verb: str  # "watched"

    @property
    def instruction(self) -> str:
        return (f"Given a list of {self.plural} the user has {self.verb} before, "
                f"please recommend a new {self.singular} that the user likes to the user.")

    @property
    def history_prefix(self) -> str:
        # The reference notebooks put no space after the colon.
        return f"The user has {self.verb} the following {self.plural} before:"


DOMAINS: dict[str, Domain] = {
    "movie": Domain("movies", "movie", "watched"),
    "game": Domain("video games", "video game", "played"),
    "book": Domain("books", "book", "read"),
    "music": Domain("music", "music", "listened to"),
    "toy": Domain("toys", "toy", "played"),
    "product": Domain("products", "product", "bought"),
}

# Amazon 2018 category file names -> domain wording.
AMAZON_CATEGORY_DOMAINS: dict[str, str] = {
    "Video_Games": "game",
    "Movies_and_TV": "movie",
    "Books": "book",
    "Kindle_Store": "book",
    "CDs_and_Vinyl": "music",
    "Digital_Music": "music",
    "Toys_and_Games": "toy",
}


def domain_for_category(category: str) -> Domain:
    """Wording for an Amazon category; unknown categories get a generic product wording."""
    key = AMAZON_CATEGORY_DOMAINS.get(category)
    if key:
        return DOMAINS[key]
    noun = category.replace("_and_", " and ").replace("_", " ").strip().lower() or "product"
    return Domain(f"{noun} products", f"{noun} product", "bought") if noun != "product" else DOMAINS["product"]


def normalize_title(title: object) -> str:
    """The one title normalisation: unescape HTML, strip spaces and surrounding quotes."""
    text = html.unescape(str(title)).strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return " ".join(text.split())


def quote(title: str) -> str:
    return f'"{title}"'


def instruction_row(domain: Domain, history_titles: list[str], target_title: str) -> dict[str, str]:
    """One reference instruction row: instruction, quoted comma-separated history, quoted target."""
    history = domain.history_prefix + ", ".join(quote(t) for t in history_titles)
    return {"instruction": domain.instruction, "input": f"{history}\n ", "output": quote(target_title)}


def alpaca_prompt(instruction: str, input_text: str = "", output: str = "") -> str:
    """The Alpaca prompt used for training and generation (pass ``output=""`` to generate)."""
    if input_text:
        return (f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n"
                f"### Response:\n{output}")
    return f"{ALPACA_PREAMBLE_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"


def prompt_for_row(row: dict, with_output: bool = False) -> str:
    """Prompt text for an instruction row (the response left empty unless ``with_output``)."""
    return alpaca_prompt(row["instruction"], row.get("input", ""), row.get("output", "") if with_output else "")
