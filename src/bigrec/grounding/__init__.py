"""Step 2 of BIGRec: generations become vectors, vectors become rankings of the whole catalogue."""
