"""Measurements about amp itself, above the pipeline: `amp bench` (search, throughput,
passes, the models sweep) and `amp study` (the method against baselines over seeds)."""
