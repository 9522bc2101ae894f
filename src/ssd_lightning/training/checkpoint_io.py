"""How Lightning writes and reads this project's checkpoints (a ``CheckpointIO`` plugin the
builders give every Trainer).

- Writes are atomic (``config.atomic``): a kill during a save leaves the previous ``last.ckpt``
  intact, wherever ``$TMPDIR`` is (Lightning's own writer stages the file there, and its final
  move becomes a non-atomic copy across filesystems).
- Reads go through ``training.checkpoint.read_checkpoint``: weights-only whatever the environment
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, torch < 2.6's default), so resuming from a file someone
  else wrote cannot run code; a corrupt file is one ``CheckpointError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ssd_lightning.config.atomic import atomic_write
from ssd_lightning.training.checkpoint import read_checkpoint


class RunCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is not the caller's to relax: every checkpoint here is plain data
        return read_checkpoint(path, map_location=map_location or "cpu")
