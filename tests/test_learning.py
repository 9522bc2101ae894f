"""End to end: from random init the detector learns to find every pedestrian on real images."""

import torch
from torchvision.ops import box_iou

from ssd_lightning.config.paths import load_option
from ssd_lightning.core import SSD, MultiBoxLoss
from ssd_lightning.data.batch import collate_fn
from ssd_lightning.data.dataset import PennFudanDataset
from ssd_lightning.data.presets import build_eval_transform

DATA = "data/PennFudanPed"
NAMES = ["FudanPed00001.png", "FudanPed00002.png", "PennPed00010.png", "PennPed00020.png"]


def _found(model, batch):
    """Per image: how many GT boxes some detection overlaps with IoU >= 0.5 (default thresholds)."""
    model.eval()
    detections = model.detect(batch.images, batch.orig_sizes)  # boxes in original pixels
    model.train()
    found = []
    for det, boxes, mask, (h, w) in zip(
        detections, batch.boxes, batch.mask, batch.orig_sizes.tolist(), strict=True
    ):
        gt = boxes[mask] / 300 * torch.tensor([w, h, w, h])
        iou = box_iou(gt, det["boxes"]) if len(det["boxes"]) else torch.zeros(len(gt), 1)
        found.append(int((iou.max(1).values >= 0.5).sum()))
    return found


def test_model_learns_to_find_every_pedestrian():
    torch.manual_seed(0)
    dataset = PennFudanDataset(DATA, NAMES, transforms=build_eval_transform(300))
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    total = batch.mask.sum(1).tolist()
    model = SSD(load_option("anchors", "tall_skinny"), weights="none")
    criterion = MultiBoxLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gt = batch.boxes / 300  # xyxy normalized
    losses = []
    for _ in range(80):
        loc, logits = model(batch.images)
        out = criterion(
            loc, logits, gt, batch.labels, batch.mask, model.anchors_cxcywh, model.anchors_xyxy
        )
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.1 * losses[0]
    assert _found(model, batch) == total, "the trained model misses a pedestrian"
