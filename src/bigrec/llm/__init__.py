"""Language-model machinery: loading, SFT data, training pieces, free and constrained beam search."""
