"""Raw dataset readers, sequence windows and time splits.

Every reader returns an :class:`~bigrec.data.interactions.Interactions` (or, for sources that
come already split, :class:`~bigrec.data.interactions.SplitExamples`), so that one code path
turns any source into the same prepared files.
"""
