"""Network builders driven by config, plus torchsummary-style introspection.

Two generic builders (``conv_net`` and ``resnet``) cover every row of the study's Table 2, so a
new variant is a YAML file, not a class. Activations, pooling to the head and flattening are
functional (``F.relu``, ``F.adaptive_avg_pool2d``, ``torch.flatten``) so that ``summary`` lists
exactly the layers of the study's §5.1.2 table (no ReLU / pool / flatten rows), and modules are
registered in forward order so that ``describe`` can read the architecture off the module tree.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def _check_dropout(dropout: float) -> float:
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout}")
    return dropout


def _check_sizes(name: str, values: Sequence[int], allow_empty: bool = True) -> list[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"model.{name} must be a list of positive integers, got {values!r}")
    out = [int(v) for v in values]
    if any(v <= 0 for v in out) or (not allow_empty and not out):
        raise ConfigError(f"model.{name} must be a non-empty list of positive integers, got {out}")
    return out


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
    channels = _check_sizes("conv_channels", conv_channels, allow_empty=False)
    hidden_sizes = _check_sizes("hidden", hidden)
    dropout = _check_dropout(dropout)
    kernel_size, padding, pool = int(kernel_size), int(padding), int(pool)
    if kernel_size < 1 or padding < 0 or pool < 1:
        raise ConfigError(
            f"model: need kernel_size >= 1, padding >= 0, pool >= 1; "
            f"got {kernel_size}, {padding}, {pool}"
        )
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


def _stage_spec(stage: Any, index: int) -> tuple[int, int, int]:
    """Accept {channels, blocks, stride} (stride defaults to 1) or a [channels, blocks, stride]."""
    if isinstance(stage, Mapping):
        unknown = set(stage) - {"channels", "blocks", "stride"}
        if unknown or "channels" not in stage or "blocks" not in stage:
            raise ConfigError(
                f"model.stages[{index}] needs keys channels, blocks (and optional stride); "
                f"got {sorted(stage)}"
            )
        spec = (stage["channels"], stage["blocks"], stage.get("stride", 1))
    elif isinstance(stage, Sequence) and not isinstance(stage, (str, bytes)) and len(stage) == 3:
        spec = tuple(stage)
    else:
        raise ConfigError(
            f"model.stages[{index}] must be {{channels, blocks, stride}}, got {stage!r}"
        )
    channels, blocks, stride = (int(v) for v in spec)
    if channels < 1 or blocks < 1 or stride < 1:
        raise ConfigError(f"model.stages[{index}] values must be positive, got {spec}")
    return channels, blocks, stride


def resnet(
    stem_channels: int = 64,
    stages: Sequence[Mapping[str, int]] = _DEFAULT_STAGES,
    pool_size: int = 6,
    hidden: Sequence[int] = (500,),
    dropout: float = 0.0,
    num_classes: int = 7,
    in_channels: int = 1,
    image_size: int = 48,
) -> nn.Module:
    """Stem Conv3x3(no bias)+BN+ReLU, stages of basic ResBlocks, avg-pool to pool_size, MLP head.

    The first block of a stage carries the stride. Pooling to a fixed ``pool_size`` (as §5.1.2's
    Linear-25, 2,304,500 = 128*6*6*500 + 500, implies) makes the head independent of
    ``image_size``, which is only checked for being large enough.
    """
    stem_channels, pool_size = int(stem_channels), int(pool_size)
    if stem_channels < 1 or pool_size < 1:
        raise ConfigError(
            f"model: stem_channels and pool_size must be positive, got {stem_channels}, {pool_size}"
        )
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
        raise ConfigError(f"model.stages must be a non-empty list, got {stages!r}")
    hidden_sizes = _check_sizes("hidden", hidden)
    dropout = _check_dropout(dropout)
    blocks: list[nn.Module] = []
    width, size = stem_channels, int(image_size)
    for i, stage in enumerate(stages):
        channels, n_blocks, stride = _stage_spec(stage, i)
        for b in range(n_blocks):
            blocks.append(ResBlock(width, channels, stride if b == 0 else 1))
            width = channels
        size = (size - 1) // stride + 1  # 3x3 conv, padding 1
    if size < 1:
        raise ConfigError(f"model: image_size {image_size} is too small for the strides")
    head = _mlp_head(width * pool_size * pool_size, hidden_sizes, dropout, int(num_classes))
    return ResNet(
        nn.Conv2d(int(in_channels), stem_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(stem_channels),
        nn.Sequential(*blocks),
        pool_size,
        head,
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"cnn": conv_net, "resnet": resnet}


def _to_plain(cfg: Any) -> dict[str, Any]:
    """OmegaConf DictConfig (interpolations resolved) or any Mapping -> plain dict."""
    from omegaconf import DictConfig, OmegaConf  # a dependency; imported here to keep import light

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(plain, dict)
        return {str(k): v for k, v in plain.items()}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def build_model(cfg: Any, num_classes: int = 7, image_size: int = 48) -> nn.Module:
    """Build the network named by ``cfg.builder`` ('cnn' | 'resnet') with cfg's other keys.

    Keys the builder does not take (``name``, ``description``, comments-as-keys...) are
    ignored, so a config can carry metadata; but a key that is a near-miss of a builder argument
    (``hiden``) is an error, because silently ignoring a typo would train the wrong network.
    ``num_classes`` and ``image_size`` come from the data, so they are the arguments here, not
    config keys.
    """
    params = _to_plain(cfg)
    builder_name = params.pop("builder", None)
    if builder_name not in _BUILDERS:
        raise ConfigError(f"model.builder must be one of {sorted(_BUILDERS)}, got {builder_name!r}")
    builder = _BUILDERS[builder_name]
    accepted = set(inspect.signature(builder).parameters) - {"num_classes", "image_size"}
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key in accepted:
            kwargs[key] = value
            continue
        close = difflib.get_close_matches(str(key), sorted(accepted), n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"model.{key} is not an argument of the '{builder_name}' builder; "
                f"did you mean model.{close[0]}?"
            )
    try:
        return builder(**kwargs, num_classes=num_classes, image_size=image_size)
    except TypeError as exc:  # e.g. a missing required argument such as conv_channels
        raise ConfigError(f"model ({builder_name}): {exc}") from exc


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
