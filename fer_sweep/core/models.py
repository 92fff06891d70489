"""Network builders driven by config, plus torchsummary-style introspection.

Two generic builders (``conv_net`` and ``resnet``) cover every row of the study's Table 2, so a
new variant is a YAML file, not a class. Activations, pooling to the head and flattening are
functional (``F.relu``, ``F.adaptive_avg_pool2d``, ``torch.flatten``) so that ``summary`` lists
exactly the layers of the study's §5.1.2 table (no ReLU / pool / flatten rows), and modules are
registered in forward order so that ``describe`` can read the architecture off the module tree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fer_sweep.core.config import ModelConfig
from fer_sweep.errors import ConfigError

__all__ = [
    "ConvNet",
    "ResBlock",
    "ResNet",
    "build_model",
    "conv_net",
    "count_parameters",
    "describe",
    "resnet",
    "summary",
    "summary_text",
]

_DEFAULT_STAGES: tuple[Mapping[str, int], ...] = (
    {"channels": 64, "blocks": 2, "stride": 1},
    {"channels": 128, "blocks": 2, "stride": 2},
)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _mlp_head(
    in_features: int, hidden: Sequence[int], dropout: float, num_classes: int
) -> nn.ModuleList:
    """Linear (+Dropout) per hidden size, then the classifier; ReLU is applied in forward."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, int(h)))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.ModuleList(layers)


def _run_head(head: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Linear -> ReLU -> (Dropout) for each hidden layer; the last Linear yields logits."""
    last = len(head) - 1
    for i, layer in enumerate(head):
        x = layer(x)
        if isinstance(layer, nn.Linear) and i != last:
            x = F.relu(x)
    return x


class ConvNet(nn.Module):
    """Plain CNN: [Conv2d -> (BatchNorm2d) -> ReLU -> MaxPool2d]*, flatten, MLP head."""

    def __init__(self, features: nn.ModuleList, head: nn.ModuleList) -> None:
        super().__init__()
        self.features = features  # flat, in forward order: Conv2d, [BatchNorm2d], MaxPool2d, ...
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                x = F.relu(x)  # conv -> (bn) -> relu -> pool
            x = layer(x)
        return _run_head(self.head, torch.flatten(x, 1))


class ResBlock(nn.Module):
    """Basic residual block: conv3x3-bn-relu-conv3x3-bn, plus shortcut, then relu.

    The shortcut is a 1x1 conv + BN only when the shape changes (stride or channels), and
    ``None`` otherwise (an ``nn.Identity`` would add a row to the summary table). Registration
    order conv1, bn1, conv2, bn2, shortcut matches the call order of §5.1.2 (Conv2d-13..BN-18).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem conv-bn-relu, stages of ResBlocks, adaptive avg-pool (functional), flatten, MLP head."""

    def __init__(
        self,
        stem: nn.Conv2d,
        stem_bn: nn.BatchNorm2d,
        stages: nn.Sequential,
        pool_size: int,
        head: nn.ModuleList,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stem_bn = stem_bn
        self.stages = stages
        self.pool_size = pool_size
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.stages(x)
        x = F.adaptive_avg_pool2d(x, self.pool_size)
        return _run_head(self.head, torch.flatten(x, 1))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def conv_net(
    conv_channels: Sequence[int],
    kernel_size: int = 3,
    padding: int = 0,
    pool: int = 2,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    batchnorm: bool = False,
    num_classes: int = 7,
    in_channels: int = 1,
    image_size: int = 48,
) -> nn.Module:
    """[Conv2d -> (BatchNorm2d) -> ReLU -> MaxPool2d] per entry, flatten, MLP head.

    The flatten size is computed from ``image_size`` (never typed in config): the study's
    Linear-720 is what a 32x32 input gives, 48x48 FER2013 images give 2000. Convs drop their
    bias when followed by BatchNorm (it would be cancelled by the BN mean anyway).
    """
    channels, hidden_sizes = list(conv_channels), list(hidden)
    features: list[nn.Module] = []
    size, width = int(image_size), int(in_channels)
    for c in channels:
        features.append(nn.Conv2d(width, c, kernel_size, padding=padding, bias=not batchnorm))
        if batchnorm:
            features.append(nn.BatchNorm2d(c))
        features.append(nn.MaxPool2d(pool))
        size = (size + 2 * padding - kernel_size + 1) // pool  # conv (stride 1), then floor pool
        width = c
        if size < 1:
            raise ConfigError(
                f"model: {len(channels)} conv+pool stages shrink a {image_size}x{image_size} "
                f"image to nothing; use fewer conv_channels, padding, or a smaller pool"
            )
    head = _mlp_head(width * size * size, hidden_sizes, dropout, int(num_classes))
    return ConvNet(nn.ModuleList(features), head)


def resnet(
    stem_channels: int = 64,
    stages: Sequence[Mapping[str, int]] = _DEFAULT_STAGES,
    pool_size: int = 6,
    hidden: Sequence[int] = (500,),
    dropout: float = 0.0,
    num_classes: int = 7,
    in_channels: int = 1,
    image_size: int = 48,
    *,
    stem_stride: int = 1,
) -> nn.Module:
    """Stem Conv3x3(no bias)+BN+ReLU, stages of basic ResBlocks, avg-pool to pool_size, MLP head.

    The first block of a stage carries the stride; ``stem_stride`` 2 makes the stem work at half
    the resolution (every later layer then costs a quarter). Pooling to a fixed ``pool_size``
    (as §5.1.2's Linear-25, 2,304,500 = 128*6*6*500 + 500, implies) makes the head independent of
    ``image_size``, which is only checked for being large enough.
    """
    hidden_sizes = list(hidden)
    blocks: list[nn.Module] = []
    width, size = stem_channels, (int(image_size) - 1) // stem_stride + 1
    for stage in stages:
        channels, n_blocks, stride = stage["channels"], stage["blocks"], stage.get("stride", 1)
        for b in range(n_blocks):
            blocks.append(ResBlock(width, channels, stride if b == 0 else 1))
            width = channels
        size = (size - 1) // stride + 1  # 3x3 conv, padding 1
    if size < 1:
        raise ConfigError(f"model: image_size {image_size} is too small for the strides")
    head = _mlp_head(width * pool_size * pool_size, hidden_sizes, dropout, int(num_classes))
    return ResNet(
        nn.Conv2d(int(in_channels), stem_channels, 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(stem_channels),
        nn.Sequential(*blocks),
        pool_size,
        head,
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"cnn": conv_net, "resnet": resnet}


def build_model(cfg: ModelConfig, num_classes: int = 7, image_size: int = 48) -> nn.Module:
    """Build the network named by ``cfg.builder`` ('cnn' | 'resnet') from the typed model
    config (checked by the schema). ``num_classes`` and ``image_size`` come from the data, so
    they are arguments here, not config keys."""
    builder = _BUILDERS[cfg.builder]
    return builder(**cfg.builder_kwargs(), num_classes=num_classes, image_size=image_size)


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError("summary needs a model with a Conv2d to infer its input channels")


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def summary(model: nn.Module, image_size: int = 48) -> list[tuple[str, list[int], int]]:
    """Rows (``'Conv2d-1'``, ``[-1, 64, 48, 48]``, params) like torchsummary / §5.1.2.

    Forward hooks on every module except containers and the model itself, numbered in the order
    their forward *returns* (so a ResBlock comes after its convs, as in §5.1.2). Runs a batch of
    two zero images in eval mode (no BN statistics are touched) and restores the mode.
    """
    rows: list[tuple[str, list[int], int]] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((f"{type(module).__name__}-{len(rows) + 1}", [-1, *out.shape[1:]], params))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if m is not model and not isinstance(m, _CONTAINERS)
    ]
    was_training = model.training
    try:
        first = next(model.parameters())
        x = torch.zeros(
            2, _in_channels(model), image_size, image_size, device=first.device, dtype=first.dtype
        )
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def summary_text(model: nn.Module, image_size: int = 48) -> str:
    """torchsummary-style table (as printed in §5.1.2), sizes assuming float32 like torchsummary."""
    rows = summary(model, image_size)
    total = sum(p.numel() for p in model.parameters())
    trainable = count_parameters(model)
    line, double = "-" * 64, "=" * 64
    out = [line, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", double]
    out += [f"{name:>20}  {str(shape):>25} {params:>15,}" for name, shape, params in rows]
    mb = 4.0 / 1024**2
    input_mb = _in_channels(model) * image_size * image_size * mb
    act_mb = 2.0 * sum(math.prod(shape[1:]) for _, shape, _ in rows) * mb  # forward + backward
    params_mb = total * mb
    out += [
        double,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        line,
        f"Input size (MB): {input_mb:.2f}",
        f"Forward/backward pass size (MB): {act_mb:.2f}",
        f"Params size (MB): {params_mb:.2f}",
        f"Estimated Total Size (MB): {input_mb + act_mb + params_mb:.2f}",
        line,
    ]
    return "\n".join(out)


def _describe_module(m: nn.Module) -> list[str]:
    if isinstance(m, ResBlock):
        return [f"ResBlock-{m.out_channels}"]
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return [f"Conv2d-{m.out_channels}-{kh}x{kw}"]
    if isinstance(m, nn.BatchNorm2d):
        return [f"BatchNorm2d-{m.num_features}"]
    if isinstance(m, nn.MaxPool2d):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        return [f"MaxPool2d-{k[0]}x{k[1]}"]
    if isinstance(m, nn.Linear):
        return [f"Linear-{m.in_features}-{m.out_features}"]
    if isinstance(m, nn.Dropout):
        return [f"Dropout-{m.p:g}"]
    return [part for child in m.children() for part in _describe_module(child)]


def describe(model: nn.Module) -> str:
    """One-line description in Table 2's style, read off the model (registration = call order).

    Consecutive identical ResBlocks collapse to ``ResBlock-64 (x2)``; activations are omitted
    like in the study.
    """
    parts = _describe_module(model)
    merged: list[str] = []
    i = 0
    while i < len(parts):
        j = i
        while j + 1 < len(parts) and parts[j + 1] == parts[i] and parts[i].startswith("ResBlock"):
            j += 1
        n = j - i + 1
        merged.append(parts[i] if n == 1 else f"{parts[i]} (x{n})")
        i = j + 1
    return ", ".join(merged)
