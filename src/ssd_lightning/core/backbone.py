"""ResNet-34 trunk plus three extra blocks: six feature maps, each projected to 256 channels.

For a 300x300 input the maps are 38, 19, 10 (layer2, layer3, layer4) and 5, 3, 1 (extras C5, C6,
C7).
Sizes are read off a dummy forward at build time, so other input sizes work unchanged.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import ResNet34_Weights, resnet34

from ssd_lightning.core.norm import SafeBatchNorm2d

# layer2, layer3, layer4 and the extra blocks C5, C6, C7: the design's six maps
NUM_FEATURE_MAPS = 6
WEIGHT_NAMES = ("auto", "imagenet", "none")  # or the path of a ResNet-34 state dict
WEIGHT_CHOICES = " | ".join(WEIGHT_NAMES) + " | <path to a ResNet-34 state dict>"
_IMAGENET = ResNet34_Weights.IMAGENET1K_V1
_PROBE_HOST = "download.pytorch.org"


def _imagenet_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_IMAGENET.url).name


def _reachable(host: str = _PROBE_HOST, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_imagenet(timeout: float = 30.0) -> dict[str, Tensor]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torch.hub's urlopen has no timeout of its own
    try:
        return _IMAGENET.get_state_dict(progress=False)
    finally:
        socket.setdefaulttimeout(old)


def _load_file(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"model.net.weights={path}: cannot read a state dict from it ({e})") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.net.weights={path}: expected a ResNet-34 state dict")
    return state


def resolve_weights(weights: str) -> tuple[dict[str, Tensor] | None, str]:
    """``weights`` -> (ResNet-34 state dict, or None for random init; where it came from)."""
    if weights in ("none", "", None):
        return None, "none (random init)"
    if weights in ("auto", "imagenet"):
        cached = _imagenet_cache_file()
        if cached.is_file():
            return torch.load(cached, map_location="cpu", weights_only=True), f"imagenet ({cached})"
        if _reachable():
            try:
                return _download_imagenet(), "imagenet (downloaded)"
            except OSError as e:
                reason = f"download failed: {e}"
        else:
            reason = f"{_PROBE_HOST} is unreachable"
        if weights == "imagenet":
            raise RuntimeError(
                f"model.net.weights=imagenet: ImageNet ResNet-34 weights are not in {cached} and "
                f"{reason}. Put {_IMAGENET.url} there, pass a local file "
                "(model.net.weights=<path>), "
                "or train from scratch (model.net.weights=none)."
            )
        msg = (
            f"!!! model.net.weights=auto: no ImageNet ResNet-34 weights ({reason}; none cached at "
            f"{cached}). TRAINING FROM RANDOM INIT — expect far lower accuracy. !!!"
        )
        warnings.warn(msg, stacklevel=2)
        return None, "none (auto: ImageNet weights unavailable)"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"model.net.weights={weights}: no such file; allowed: {WEIGHT_CHOICES}")
    return _load_file(path), f"file ({path})"


def _extra_block(
    cin: int, mid: int, cout: int, kernel: int, stride: int, padding: int
) -> nn.Module:
    # the extra blocks reach 1x1 maps (C7 always, C6 at small inputs): a batch of one image must
    # still train there, hence the batch-size-safe BatchNorm
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False),
        SafeBatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, kernel, stride=stride, padding=padding, bias=False),
        SafeBatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResNet34Backbone(nn.Module):
    """images (B, 3, S, S), ImageNet-normalized -> six maps (B, out_channels, h_k, w_k)."""

    def __init__(self, image_size: int = 300, weights: str = "auto", out_channels: int = 256):
        super().__init__()
        trunk = resnet34()
        state, self.weights_source = resolve_weights(weights)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = trunk.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"model.net.weights={weights}: not a torchvision ResNet-34 state dict "
                    f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
                )
        self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1)
        self.layer2, self.layer3, self.layer4 = trunk.layer2, trunk.layer3, trunk.layer4
        # C5 and C6 halve the map; C7 must take the last map to 1x1 (a stride-2 pad-1 3x3 conv would
        # turn 3x3 into 2x2), so its kernel covers the whole C6 map, up to the design's 3x3.
        self.c5 = _extra_block(512, 256, 512, 3, 2, 1)
        self.c6 = _extra_block(512, 128, 256, 3, 2, 1)
        self.eval()  # the size probes run a batch of one: BatchNorm needs eval mode
        with torch.no_grad():
            probe = self._trunk_and_c5_c6(torch.zeros(1, 3, image_size, image_size))
        c6_size = min(probe[-1].shape[-2:])
        self.c7 = _extra_block(256, 128, 256, min(3, c6_size), 1, 0)
        in_channels = [128, 256, 512, 512, 256, 256]
        self.proj = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        for m in [*self.c5.modules(), *self.c6.modules(), *self.c7.modules(), *self.proj]:
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.eval()
        with torch.no_grad():
            maps = self(torch.zeros(1, 3, image_size, image_size))
        self.train()
        self.feature_sizes: list[tuple[int, int]] = [tuple(m.shape[-2:]) for m in maps]

    def _trunk_and_c5_c6(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer2(self.stem(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        c5 = self.c5(c4)
        return [c2, c3, c4, c5, self.c6(c5)]

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self._trunk_and_c5_c6(x)
        maps.append(self.c7(maps[-1]))
        return [proj(m) for proj, m in zip(self.proj, maps, strict=True)]
