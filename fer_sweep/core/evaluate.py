"""Evaluation of a model on a split, with test-time augmentation (TTA) views; used for
validation every epoch and for the final test numbers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_sweep.core.augment import BatchTransform
from fer_sweep.core.dataset import Split
from fer_sweep.core.device import autocast

log = logging.getLogger(__name__)


def tta_views(x: torch.Tensor, mode: str, shift: int = 2) -> Iterator[torch.Tensor]:
    """Test-time views of a normalized batch: identity, mirror, and/or ``shift``-pixel shifts
    (0 fill) up, down, left and right; ``flip_x_shift`` mirrors every shifted view too (10)."""
    shifted = [x]
    if "shift" in mode:
        padded = F.pad(x, (shift, shift, shift, shift))
        h, w = x.shape[-2:]
        for dy, dx in ((0, shift), (2 * shift, shift), (shift, 0), (shift, 2 * shift)):
            shifted.append(padded[..., dy : dy + h, dx : dx + w])
    if mode == "flip_x_shift":
        for v in shifted:
            yield v
            yield v.flip(-1)
        return
    yield x
    if "flip" in mode:
        yield x.flip(-1)
    yield from shifted[1:]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    split: Split | tuple[torch.Tensor, torch.Tensor],
    tfm: BatchTransform,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    tta: str = "none",
    tta_shift: int = 2,
) -> dict[str, Any]:
    """Loss, accuracy and softmax probabilities over a whole split, in large batches."""
    x, y = (split.x, split.y) if isinstance(split, Split) else split
    model.eval()
    probs, loss_sum = [], torch.zeros((), device=device)
    for i in range(0, len(y), batch_size):
        xb = tfm(x[i : i + batch_size].to(device, non_blocking=True), train=False)
        yb = y[i : i + batch_size].to(device, non_blocking=True)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        views = list(tta_views(xb, tta, tta_shift)) if tta != "none" else [xb]
        with autocast(device, precision):
            logits = [model(v).float() for v in views]
        p = torch.stack([lg.softmax(1) for lg in logits]).mean(0)
        if len(logits) == 1:
            loss_sum += F.cross_entropy(logits[0], yb, reduction="sum")
        else:  # the loss of what is scored: the views' averaged probabilities
            loss_sum += F.nll_loss(p.clamp_min(1e-12).log(), yb, reduction="sum")
        probs.append(p)
    prob = torch.cat(probs).cpu() if probs else torch.zeros((0, 7))
    pred = prob.argmax(1)
    n = max(len(y), 1)
    return {
        "loss": loss_sum.item() / n,
        "acc": (pred == y.cpu()).float().sum().item() / n,
        "probs": prob,
        "pred": pred,
    }
