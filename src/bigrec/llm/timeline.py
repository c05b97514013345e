"""Timeline texts (:mod:`bigrec.data.timeline`) -> token ids and labels, in chunks of ``cutoff_len``.

A chunk is the header line, some titles as context (no loss) and then target titles (loss on
their tokens and on each one's separator), tokenised as one text, exactly as generation
tokenises its prompt. The first chunk of a user's text has the first row's history as context;
a text longer than ``cutoff_len`` tokens goes on in further chunks whose context is the
``overlap`` titles before their first target (repeated, so without loss). Each target line is a
target in exactly one chunk, so every target token gets the loss exactly once.

Titles must tokenise line by line: the first target starts at a token boundary and every
separator is the one token :func:`separator_id`, as with byte-level BPE tokenizers (SmolLM2, Llama
3, Qwen, GPT-2); otherwise the prompt and the continuation would not split where generation splits
them, and an error says so. :func:`line_ids` gives a title's tokens as a line (after a separator),
then the separator: the trie's paths for constrained decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bigrec.data.timeline import SEP, Timeline, user_timelines
from bigrec.llm.sft_data import IGNORE_INDEX, Examples, read_rows, sample_indices

log = logging.getLogger(__name__)


def separator_id(tokenizer) -> int:
    """The one token of the separator; the timeline layout needs a tokenizer that has one."""
    ids = tokenizer(SEP, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer writes the separator {SEP!r} as {len(ids)} tokens; the timeline layout "
                         "needs it to be one token")
    return ids[0]


def line_ids(tokenizer, title: str) -> list[int]:
    """A title's tokens as a timeline line has them (after a separator), then the separator token."""
    sep = separator_id(tokenizer)
    ids = tokenizer(SEP + title + SEP, add_special_tokens=False)["input_ids"]
    if len(ids) < 3 or ids[0] != sep or ids[-1] != sep or sep in ids[1:-1]:
        raise ValueError(f"the tokenizer merges the separator {SEP!r} with the title {title!r}; the timeline "
                         "layout needs titles that tokenise line by line")
    return ids[1:]


def encode_chunk(tokenizer, timeline: Timeline, context: int, start: int, stop: int,
                 sep: int) -> dict[str, list[int]]:
    """Header + ``titles[context:start]`` (no loss) + ``titles[start:stop]`` (loss), as token ids and labels."""
    titles = timeline.titles
    head = timeline.header + SEP + "".join(t + SEP for t in titles[context:start])
    text = head + "".join(t + SEP for t in titles[start:stop])
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    cut = len(head)
    labels = []
    for tok, (lo, hi) in zip(ids, offsets, strict=True):
        if lo < cut < hi:
            raise ValueError(f"a token spans the end of the prompt and the title {titles[start]!r}; the timeline "
                             "layout needs titles that tokenise line by line")
        target = lo >= cut and hi > lo
        if target and SEP in text[lo:hi] and (text[lo:hi] != SEP or tok != sep):
            raise ValueError(f"the tokenizer merges the separator {SEP!r} into {text[lo:hi]!r}; the timeline "
                             "layout needs it to be one token of its own")
        labels.append(tok if target else IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def line_counts(tokenizer, timeline: Timeline) -> tuple[int, list[int]]:
    """Tokens of the header (with special tokens and its separator) and of each line, in the whole text."""
    text = timeline.text()
    starts, pos = [], len(timeline.header) + len(SEP)
    for title in timeline.titles:
        starts.append(pos)
        pos += len(title) + len(SEP)
    offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    counts = [0] * len(starts)
    head = 0
    line = 0
    for lo, _ in offsets:
        while line + 1 < len(starts) and lo >= starts[line + 1]:
            line += 1
        if lo < starts[0]:
            head += 1
        else:
            counts[line] += 1
    return head, counts


class TimelineDataset(Examples):
    """Timelines cut into chunks of at most ``cutoff_len`` tokens (held in memory, like ``SFTDataset``).

    ``chunks[i]`` = (timeline index, first context title, first target, end of targets) of example i.
    """

    def __init__(self, timelines: list[Timeline], tokenizer, cutoff_len: int, overlap: int = 10,
                 name: str = "data"):
        sep = separator_id(tokenizer)
        self.examples: list[dict[str, list[int]]] = []
        self.chunks: list[tuple[int, int, int, int]] = []
        dropped = 0
        for index, timeline in enumerate(timelines):
            head, counts = line_counts(tokenizer, timeline)
            n, start = len(timeline.titles), timeline.first_target
            while start < n:
                context = 0 if start == timeline.first_target else max(start - overlap, 0)
                while context < start and head + sum(counts[context:start]) + counts[start] > cutoff_len:
                    context += 1  # the oldest context goes first
                if head + counts[start] > cutoff_len:  # one title alone does not fit
                    dropped += 1
                    start += 1
                    continue
                stop, total = start, head + sum(counts[context:start])
                while stop < n and total + counts[stop] <= cutoff_len:
                    total += counts[stop]
                    stop += 1
                example = encode_chunk(tokenizer, timeline, context, start, stop, sep)
                while len(example["input_ids"]) > cutoff_len and stop > start + 1:  # the chunk merged differently
                    stop -= 1
                    example = encode_chunk(tokenizer, timeline, context, start, stop, sep)
                if len(example["input_ids"]) > cutoff_len:
                    dropped += 1
                    start += 1
                    continue
                self.examples.append(example)
                self.chunks.append((index, context, start, stop))
                start = stop
        if dropped:
            log.warning("%s: dropped %d target titles that do not fit in cutoff_len=%d with the header",
                        name, dropped, cutoff_len)
        self.dropped = dropped


def load_timelines(paths: list[str], sample: int = -1, seed: int = 0) -> tuple[list[Timeline], list[dict]]:
    """Each file's user texts (:func:`bigrec.data.timeline.user_timelines`), ``sample`` users drawn
    from each with ``seed``; returns (timelines, per-file selection)."""
    timelines: list[Timeline] = []
    selection: list[dict] = []
    for path in paths:
        rows = read_rows(path)
        found, disagree = user_timelines(rows, str(path))
        if disagree:
            log.warning("%s: %d rows whose history is not the end of their user's timeline so far (rows out of "
                        "time order, or filtered targets); the timelines hold the targets only", path, disagree)
        picked = sample_indices(len(found), sample, seed)
        timelines.extend(found[i] for i in picked)
        selection.append({"path": str(Path(path)), "rows": len(rows), "users": len(found), "used": len(picked),
                          "indices": picked if len(picked) < len(found) else "all"})
    return timelines, selection
