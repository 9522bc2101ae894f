"""ssd-lightning: an SSD300 / ResNet-34 pedestrian detector as a Lightning + Hydra framework."""

__version__ = "0.1.0"
