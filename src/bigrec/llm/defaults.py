"""The defaults that several places expose for one setting, each given once here.

``bigrec generate``, ``bigrec package``, ``bigrec evaluate``, ``bigrec index`` and ``bigrec demo``
(their ``Config`` options), the run manifest (:class:`bigrec.app.run_manifest.RunManifest`, what
``recommend`` and ``serve`` fall back on), the keyword defaults of the ``llm`` and ``grounding``
functions and the benchmarks' command-line defaults all take their value from here;
``tests/test_defaults.py`` checks that every one of them does. A place that means another value on
purpose names its own constant here (``DEMO_SEARCH_NODES``).

This module holds plain literals and imports nothing: ``benchmarks/device/shapes.py`` loads it by
its path, where ``bigrec`` need not be installed.
"""

# precision
PRECISION = "auto"  # bf16 where the CPU or GPU computes it natively, else fp32 (bigrec.llm.models.resolve_dtype)

# decoding (bigrec generate's --decoding, run.yaml's decoding)
DECODINGS = ("free", "constrained", "likelihood")  # every decoding: generate, the demo, run.yaml and the service
DECODING = "free"  # free beam search, then L2 grounding: the paper's method
NUM_BEAMS = 4  # free beam search: beams per row, all returned; the reference BIGRec's beam count
CONSTRAINED_BEAMS = 4  # constrained beam search: beams per row, as many as free decoding so that their lists compare
MAX_NEW_TOKENS = 64  # free decoding's bound on new tokens: beams end at their title's end, so it stops only a runaway
LENGTH_PENALTY = 1.0  # beam scores are divided by length ** this: transformers' own default, as the reference ran
GENERATE_BATCH_SIZE = 16  # rows per generate call (rows are batched by prompt length, so little is padding)

# constrained decoding's options
GHOST_THRESHOLD = 0.99  # --length_correction: tokens at least this likely do not count towards the length
CF_WEIGHT = 0.0  # weight of a conventional model's log-scores added to the beam scores: none unless asked for

# likelihood ranking (bigrec.llm.likelihood.TitleScorer.rank)
CANDIDATES = 20  # titles ranked per row: the paper's largest K, so its metrics count an exact list
SEARCH_NODES = 3072  # most title tokens a row's search feeds the model: room for a sharp model to certify its top 20
DEMO_SEARCH_NODES = 512  # the demo's: its few-shot adapter is too flat to certify a top 10 at 3072 either; 512 is faster
PRIOR_WEIGHT = 0.0  # times log p(title | an empty history), subtracted: no popularity correction unless asked for

# what a ranking leaves out
EXCLUDE_HISTORY = False  # the history's own titles stay rankable, as the reference ranks them; the flag leaves them out

# embedding (bigrec index, bigrec evaluate, bigrec.grounding)
EMBED_BATCH_SIZE = 64  # texts per embedding forward pass: titles and generations are short, so a batch needs little memory
