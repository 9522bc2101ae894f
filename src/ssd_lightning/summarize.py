"""``python -m ssd_lightning.summarize <multirun dir> [--metric M]``: one row per sweep job, best
first, as a table, summary.csv, summary.md and summary.png (see ``tools.summarize``)."""

from ssd_lightning.config.cli import run_tool
from ssd_lightning.tools.summarize import main

if __name__ == "__main__":
    run_tool(main)
