"""bigrec: LLM recommendation by bi-step grounding (Bao et al., arXiv 2308.08434)."""

__version__ = "0.1.0"
