"""``python -m ssd_lightning.anchors [report|fit] [options] [overrides]``: how well an anchor
preset covers the training boxes, and fitting a new preset (see ``tools.anchors``)."""

from ssd_lightning.config.cli import run_tool
from ssd_lightning.tools.anchors import main

if __name__ == "__main__":
    run_tool(main)
