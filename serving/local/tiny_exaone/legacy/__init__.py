"""Remote code for the tiny model as written for an older transformers (see exaone_patch)."""
