"""Conventional baselines on the prepared splits: popularity and SASRec (``bigrec baseline``).

Their per-row scores feed BIGRec's collaborative-information re-weighting (``bigrec.evaluation.scores``).
"""
