"""``python -m ssd_lightning.benchmark [key=value ...]``: throughput of the training step,
inference, the data pipeline and a short fit, as a table and JSON (see ``tools.benchmark``)."""

from ssd_lightning.config.cli import run_tool
from ssd_lightning.tools.benchmark import main

if __name__ == "__main__":
    run_tool(main)
