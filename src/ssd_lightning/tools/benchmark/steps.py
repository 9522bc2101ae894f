"""What the benchmark times: the network and a synthetic batch, and the step functions (the bare
network, the project's step, torchvision's SSD around the same network)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ssd_lightning.config.paths import load_option
from ssd_lightning.core.loss import MultiBoxLoss
from ssd_lightning.core.ssd import SSD
from ssd_lightning.core.step import forward_with_loss
from ssd_lightning.tools.benchmark.options import Options


def build_net(opts: Options, device: torch.device) -> SSD:
    net = SSD(
        load_option("anchors", opts.anchors),
        num_classes=2,
        image_size=opts.image_size,
        weights="none",
    ).to(device)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def synthetic_batch(
    batch_size: int, image_size: int, seed: int, device: torch.device, channels_last: bool
) -> dict[str, Tensor]:
    """images (B,3,S,S) in [0,1]; 1-4 pedestrian-like (tall) boxes per image, padded to G=4:
    boxes (B,G,4) xyxy in input pixels, labels (B,G), mask (B,G); orig_sizes (B,2)."""
    gen = torch.Generator().manual_seed(seed)
    b, s, g = batch_size, float(image_size), 4
    images = torch.rand(b, 3, image_size, image_size, generator=gen)
    counts = torch.randint(1, g + 1, (b,), generator=gen)
    h = s * (0.25 + 0.6 * torch.rand(b, g, generator=gen))
    w = h * (0.3 + 0.2 * torch.rand(b, g, generator=gen))
    x0 = (s - w) * torch.rand(b, g, generator=gen)
    y0 = (s - h) * torch.rand(b, g, generator=gen)
    mask = torch.arange(g)[None] < counts[:, None]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], -1) * mask[..., None]
    out = {
        "images": images,
        "boxes": boxes,
        "labels": mask.long(),
        "mask": mask,
        "orig_sizes": torch.full((b, 2), image_size, dtype=torch.int64),
    }
    out = {k: v.to(device) for k, v in out.items()}
    if channels_last:
        out["images"] = out["images"].contiguous(memory_format=torch.channels_last)
    return out


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def make_bare_step(net: nn.Module, opt: torch.optim.Optimizer, batch: dict, bf16: bool):
    device = batch["images"].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            loc, logits = net(batch["images"])
        loss = loc.float().square().mean() + logits.float().square().mean()
        loss.backward()
        opt.step()
        return loss

    return step


def make_project_step(
    net: nn.Module, criterion: MultiBoxLoss, opt: torch.optim.Optimizer, batch: dict, bf16: bool
):
    """The LightningModule's step (``core.step.forward_with_loss``) + backward + optimizer step,
    as Lightning runs it under bf16-mixed (autocast around the step, the loss in fp32)."""
    device = batch["images"].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            _, _, out = forward_with_loss(
                net, criterion, batch["images"], batch["boxes"], batch["labels"], batch["mask"]
            )
        out.total.backward()
        opt.step()
        return out.total

    return step


def make_tv_step(
    tv: nn.Module, opt: torch.optim.Optimizer, images: list[Tensor], targets: list[dict], bf16: bool
):
    device = images[0].device

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16):
            losses = tv(images, targets)
        loss = sum(v.float() for v in losses.values())
        loss.backward()
        opt.step()
        return loss

    return step
