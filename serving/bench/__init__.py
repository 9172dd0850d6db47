"""The serving benchmark: the load engine and its CLI."""
