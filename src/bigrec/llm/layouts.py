"""The layouts of the training text (``--layout``): one object each, picked by name once per stage.

A layout decides everything that differs between them: the rows ``prepare`` writes, the prompt
``generate`` feeds the model, the examples ``train`` builds, and how the model writes a title
(its token ids in the catalogue trie, the token that ends it). ``window`` (the paper's) is one
instruction prompt per example (:mod:`bigrec.data.prompts`, :mod:`bigrec.llm.sft_data`);
``timeline`` is a user's history as the lines of one text (:mod:`bigrec.data.timeline`,
:mod:`bigrec.llm.timeline`). The classes only delegate to those modules, so adding a layout is
one class here; the torch-side modules are imported where used, so ``bigrec prepare`` loads no
torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigrec.data import timeline
from bigrec.data.prompts import Domain, history_split, instruction_row, prompt_for_row

if TYPE_CHECKING:
    from bigrec.llm.sft_data import Examples
    from bigrec.llm.trie import Trie

LAYOUTS = ("window", "timeline")  # the names get_layout takes
LAYOUT_HELP = ("window: one instruction prompt per example (the paper's); timeline: each user's training "
               "interactions as one text, a title per line, the loss on every title after the first history")


class Layout(ABC):
    """What a stage needs to know of a layout; :func:`get_layout` makes one from its name."""

    name: str

    @abstractmethod
    def row(self, domain: Domain, history_titles: list[str], target_title: str) -> dict[str, str]:
        """The text fields of a prepared row (``bigrec prepare``)."""

    @abstractmethod
    def prompt(self, row: dict) -> str:
        """The generation prompt of a row: the text training puts before its target."""

    @abstractmethod
    def empty_history_prompt(self, row: dict) -> str:
        """The row's prompt with no history: what the model says to anyone (the likelihood prior)."""

    @abstractmethod
    def load_training(self, paths: list[str], sample: int = -1, seed: int = 0) -> tuple[list, list[dict]]:
        """(the training files' examples for :meth:`dataset`, ``sample`` drawn from each with ``seed``;
        per-file selection, for the run's record)."""

    @abstractmethod
    def validation_data(self, rows: list[dict]) -> list:
        """Validation rows as :meth:`dataset` takes them."""

    @abstractmethod
    def dataset(self, data: list, tokenizer, cutoff_len: int, name: str = "data", *, train_on_inputs: bool = True,
                overlap: int = 10) -> Examples:
        """Tokenised training examples of ``data`` (``train_on_inputs``: window; ``overlap``: timeline)."""

    @abstractmethod
    def response_ids(self, tokenizer, title: str) -> list[int]:
        """A title's token ids as the model writes it after the prompt, :meth:`end_token` last."""

    @abstractmethod
    def end_token(self, tokenizer) -> int:
        """The token that ends every title in the trie (the model was taught to write it there)."""

    @abstractmethod
    def stop_token(self, tokenizer) -> int | None:
        """The token that ends a free-decoded title; None: the title's own end (quotes, EOS)."""

    def trie(self, tokenizer, titles: Sequence[str]) -> Trie:
        """The trie of ``titles`` (by item id) as this layout writes them, for constrained decoding and ranking."""
        from bigrec.llm.trie import Trie

        return Trie.from_token_ids(titles, lambda title: self.response_ids(tokenizer, title), self.end_token(tokenizer))


@dataclass(frozen=True)
class WindowLayout(Layout):
    """The paper's: one instruction prompt per example, in ``prompt_template`` (alpaca or d3; d3 needs
    ``category`` or each row's), the quoted title then EOS as the response."""

    prompt_template: str = "alpaca"
    category: str | None = None
    name = "window"

    def row(self, domain: Domain, history_titles: list[str], target_title: str) -> dict[str, str]:
        return instruction_row(domain, history_titles, target_title)

    def prompt(self, row: dict) -> str:
        return prompt_for_row(row, template=self.prompt_template, category=self.category)

    def empty_history_prompt(self, row: dict) -> str:
        return self.prompt({**row, "input": f"{history_split(row)[0]}\n "})

    def load_training(self, paths: list[str], sample: int = -1, seed: int = 0) -> tuple[list, list[dict]]:
        from bigrec.llm.sft_data import load_rows

        return load_rows(paths, sample, seed)

    def validation_data(self, rows: list[dict]) -> list:
        return rows

    def dataset(self, data: list, tokenizer, cutoff_len: int, name: str = "data", *, train_on_inputs: bool = True,
                overlap: int = 10) -> Examples:
        from bigrec.llm.sft_data import SFTDataset

        return SFTDataset(data, tokenizer, cutoff_len, train_on_inputs, name)

    def response_ids(self, tokenizer, title: str) -> list[int]:
        from bigrec.llm.trie import response_ids

        return response_ids(tokenizer, title, self.prompt_template)

    def end_token(self, tokenizer) -> int:
        from bigrec.llm.trie import eos_id

        return eos_id(tokenizer)

    def stop_token(self, tokenizer) -> int | None:
        return None


@dataclass(frozen=True)
class TimelineLayout(Layout):
    """Each user's training interactions as one text, a title per line: a row's prompt is the start
    of its user's text, and a title ends at the line's separator (:mod:`bigrec.data.timeline`)."""

    name = "timeline"

    def row(self, domain: Domain, history_titles: list[str], target_title: str) -> dict[str, str]:
        return timeline.timeline_row(domain, history_titles, target_title)

    def prompt(self, row: dict) -> str:
        return timeline.prompt(row)

    def empty_history_prompt(self, row: dict) -> str:
        return row["instruction"] + timeline.SEP

    def load_training(self, paths: list[str], sample: int = -1, seed: int = 0) -> tuple[list, list[dict]]:
        """Each file's user texts, ``sample`` users drawn from each."""
        from bigrec.llm.timeline import load_timelines

        return load_timelines(paths, sample, seed)

    def validation_data(self, rows: list[dict]) -> list:
        """Each validation row as a timeline whose only target is its own."""
        return [timeline.row_timeline(r) for r in rows]

    def dataset(self, data: list, tokenizer, cutoff_len: int, name: str = "data", *, train_on_inputs: bool = True,
                overlap: int = 10) -> Examples:
        """Chunks of ``cutoff_len`` tokens, the loss on the targets only (whatever ``train_on_inputs``)."""
        from bigrec.llm.timeline import TimelineDataset

        return TimelineDataset(data, tokenizer, cutoff_len, overlap, name)

    def response_ids(self, tokenizer, title: str) -> list[int]:
        from bigrec.llm.timeline import line_ids

        return line_ids(tokenizer, title)

    def end_token(self, tokenizer) -> int:
        from bigrec.llm.timeline import separator_id

        return separator_id(tokenizer)

    def stop_token(self, tokenizer) -> int | None:
        return self.end_token(tokenizer)


def get_layout(name: str, prompt_template: str = "alpaca", category: str | None = None) -> Layout:
    """The layout ``name`` (one of :data:`LAYOUTS`); ``prompt_template`` and ``category`` word the window
    layout's prompt, while the timeline layout has its own."""
    if name == "window":
        return WindowLayout(prompt_template, category)
    if name == "timeline":
        if prompt_template != "alpaca":
            raise ValueError("--prompt_template applies to the window layout; --layout timeline has its own prompt")
        return TimelineLayout()
    raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")
