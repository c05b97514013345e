"""Reading result files and scoring rankings: all-rank metrics, intervals, comparisons, reports."""
