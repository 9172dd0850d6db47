"""The serving spec: one typed source for model, vLLM and adapter set."""
