"""Prompt text, in one place for training, generation and serving.

The instruction rows follow the reference BIGRec notebooks word for word, so that models
trained with the reference scripts see the same prompts. The reference training script ends
the Alpaca preamble with "request. " and its inference script with "request.  "; here one
template serves both.

A second template, ``"d3"``, is the prompt of the D3 code ("Decoding Matters", the authors'
follow-up; its ``code/dataset.py`` with ``K=0``), word for word including its typos, so that
checkpoints trained with that code (the released ``BIGRec_<Category>_0.5B`` full fine-tunes of
Qwen2-0.5B) see their training prompt. Its response is the quoted title followed by a newline.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from bigrec.io import InputError

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
    words = category.replace("_and_", " and ").replace("_", " ").lower().split()
    if words and words[-1] in ("product", "products"):  # Office_Products: "office products", not "... products products"
        words = words[:-1]
    noun = " ".join(words)
    return Domain(f"{noun} products", f"{noun} product", "bought") if noun else DOMAINS["product"]


def domain_for_plural(plural: str) -> Domain:
    """The wording whose plural is ``plural``, as ``bigrec prepare`` builds it (``DOMAINS`` or
    :func:`domain_for_category`): prepare records only the plural (``domain_wording`` in its
    config.yaml), and the two ways it words a domain determine the rest from it."""
    for domain in DOMAINS.values():
        if domain.plural == plural:
            return domain
    noun = plural.removesuffix(" products")
    if noun and noun != plural:
        return Domain(plural, f"{noun} product", "bought")
    raise InputError(f"domain wording {plural!r} is neither one of {', '.join(d.plural for d in DOMAINS.values())} "
                     "nor a category's '... products'")


def normalize_title(title: object) -> str:
    """The one title normalisation: unescape HTML, strip spaces and surrounding quotes."""
    text = html.unescape(str(title)).strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return " ".join(text.split())


# MovieLens (and other catalogues) move a leading article behind the title: "Shining, The (1980)".
_TRAILING_ARTICLE = re.compile(
    r"^(?P<body>.+?), (?P<article>The|A|An|L'|La|Le|Les|Il|Lo|Gli|I|Das|Der|Die|El|Los|Las|Det|Den)"
    r"(?P<tail> \([^()]*\))?$")


def natural_title(title: str) -> str:
    """Put a trailing article back in front: "Shining, The (1980)" -> "The Shining (1980)".

    Language models know titles in the order people write them, so generations come out as
    "The Shining (1980)"; embedding both sides in that order lets one find the other.
    Titles without a trailing article are returned unchanged.
    """
    match = _TRAILING_ARTICLE.match(title)
    if not match:
        return title
    article = match["article"]
    space = "" if article.endswith("'") else " "  # L'Enfer, not L' Enfer
    return f"{article}{space}{match['body']}{match['tail'] or ''}"


def title_forms(title: str) -> set[str]:
    """A title as the catalogue writes it and with its article in front: the forms in which a
    generation copies it."""
    return {title, natural_title(title)}


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


TEMPLATES = ("alpaca", "d3")

# D3's training script maps the Amazon category file name to the word its prompt uses.
D3_CATEGORIES: dict[str, str] = {
    "Office_Products": "office products", "Books": "books", "steam": "games", "STEAM": "games",
    "CDs_and_Vinyl": "musics", "Toys_and_Games": "toys and games", "Video_Games": "video games",
    "Musical_Instruments": "music instruments", "Sports_and_Outdoors": "sports and outdoors",
    "Pet_Supplies": "pet supplies", "Arts_Crafts_and_Sewing": "arts products", "Movies": "movie",
}
D3_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n"
)


def d3_category(category: str) -> str:
    """The word D3's prompt uses for a category: its own table, else the name in lower case."""
    return D3_CATEGORIES.get(category) or category.replace("_", " ").strip().lower()


def d3_prompt(category: str, history_titles: list[str] | str, output: str = "") -> str:
    """The D3 prompt (``K=0``); ``category`` is the word (see :func:`d3_category`).

    ``history_titles`` is a list of titles or the already joined ``"A", "B"`` text. D3 tokenises
    the part up to the instruction and the rest separately; for byte-level BPE tokenizers the
    joined text tokenises identically at that boundary (a newline before ``###``).
    """
    history = history_titles if isinstance(history_titles, str) else ", ".join(quote(t) for t in history_titles)
    instruction = (f"Given a list of {category} the user recetenly enjoy, "
                   f"please write a new {category} that the user may bought")
    user_input = f"The user has palyed the following {category}s before: {history}"
    return f"{D3_PREAMBLE}{instruction}\n### User Input: \n{user_input}\n\n### Response: \n{output}"


def response_text(output: str, template: str = "alpaca") -> str:
    """The response a model was trained on for a quoted title (D3 adds a newline); EOS follows it."""
    if template == "d3":
        return f"{output}\n"
    if template == "alpaca":
        return output
    raise InputError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")


def history_split(row: dict) -> tuple[str, str]:
    """A bigrec instruction row's input as (the words up to "before:", the joined quoted history)."""
    head, sep, tail = str(row.get("input", "")).partition(" before:")
    if not sep:
        raise InputError(f"row input {str(row.get('input', ''))[:80]!r} does not hold a '... before:' history")
    return head + sep, tail.strip()


def _history_text(row: dict) -> str:
    """The joined quoted history of a bigrec instruction row (the text after "before:")."""
    return history_split(row)[1]


def prompt_for_row(row: dict, with_output: bool = False, template: str = "alpaca",
                   category: str | None = None) -> str:
    """Prompt text for an instruction row (the response left empty unless ``with_output``).

    ``template="d3"`` needs the D3 category word: ``category`` or the row's ``"category"``.
    """
    if template == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input", ""), row.get("output", "") if with_output else "")
    if template == "d3":
        word = category or row.get("category")
        if not word:
            raise InputError("the d3 prompt template needs a category word (e.g. 'video games'); "
                             "pass --category or use d3_category('Video_Games')")
        output = response_text(row.get("output", ""), "d3") if with_output else ""
        return d3_prompt(word, _history_text(row), output)
    raise InputError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")
