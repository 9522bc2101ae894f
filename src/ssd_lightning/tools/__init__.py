"""The command-line tools besides train / evaluate / predict: the anchor report and fit, the
sweep summary and the benchmark. Each is reached as ``python -m ssd_lightning.<tool>``."""
