"""Data: manifest check, download, datasets (Penn-Fudan, COCO), v2 augmentation, DataModules.

Box format at every boundary of this package: xyxy corners in pixels of the image they belong
to, continuous pixel-edge convention (pixel ``i`` spans ``[i, i + 1)``, so a one-pixel box has
width 1 and boxes lie in ``[0, W] x [0, H]``).
"""
# Submodules are imported directly (`from ssd_lightning.data.dataset import ...`); nothing is
# imported here so `python -m ssd_lightning.data.manifest` runs without a runpy warning.
