"""One module per deploy step, each converge-shaped (``converge``): probe, plan, apply, probe
again."""
