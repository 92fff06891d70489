"""The reference study (R. Groves, 2023) as data: Table 2's seven networks with their reported
accuracies, Table 1's class names, the ensemble's score; and a run described in the study's
words (network, transforms), so our rows read like its table."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StudyRow:
    """One row of the study's Table 2, as printed (accuracy in percent)."""

    row: int
    model: str
    network: str
    transforms: str
    epochs: int
    train_loss: float
    acc: float


_AUG = "Normalize, RandomRotation(10), RandomAffine(degrees=0, translate=(0.1, 0.1))"
_RES = (
    "Conv2d-64-3x3, BatchNorm2d-64, Conv2d-64-3x3, BatchNorm2d-64, ResBlock-64 (x2), "
    "Conv2d-128-3x3, BatchNorm2d-128, ResBlock-128 (x2), Linear-8192-500"
)
_CNN2 = "Conv2d-10-3x3, MaxPool2d-2x2, Conv2d-20-3x3, MaxPool2d-2x2"

# The reference study, §4.1 Table 2, in its order; matched to our runs by model name
# (conf/model/<name>.yaml), which is how conf/table2/row<N>.yaml picks each row's network.
STUDY_TABLE2: tuple[StudyRow, ...] = (
    StudyRow(
        1,
        "cnn2",
        f"{_CNN2}, Linear-720-300, Linear-300-150, Linear-150-7",
        "Normalize",
        50,
        0.015543,
        52.6,
    ),
    StudyRow(
        2,
        "cnn2_fc1000",
        f"{_CNN2}, Linear-1000, Linear-250-1000, Linear-1000-7",
        "Normalize",
        500,
        0.016786,
        51.3,
    ),
    StudyRow(
        3,
        "cnn2_fc3",
        f"{_CNN2}, Linear-1000-1000, Linear-250-1000, Linear-100-250, Linear-7-100",
        "Normalize",
        500,
        0.017463,
        51.4,
    ),
    StudyRow(
        4,
        "cnn3",
        f"{_CNN2}, Conv2d-40-3x3, MaxPool2d-2x2, Linear-360-300, Linear-300-150, Linear-150-7",
        "Normalize",
        100,
        0.015525,
        50.4,
    ),
    StudyRow(
        5,
        "resnet_small",
        "Conv2d-64-3x3, BatchNorm2d-64, ResBlock-64 (2 layers), "
        "Conv2d-128-3x3, BatchNorm2d-128, ResBlock-128 (2 layers), Linear-8192-500, "
        "Linear-500-7",
        "Normalize",
        100,
        0.012914,
        60.4,
    ),
    StudyRow(6, "resnet", f"{_RES}, Linear-500-7", _AUG, 100, 0.004955, 65.9),
    StudyRow(7, "resnet_dropout", f"{_RES}, Dropout-500, Linear-500-7", _AUG, 100, 0.009753, 63.3),
)
STUDY_BY_MODEL: dict[str, StudyRow] = {r.model: r for r in STUDY_TABLE2}

# The study's Table 1 (train / validation / test), keyed by fer_sweep.core.dataset.CLASSES names.
STUDY_TABLE1: dict[str, tuple[int, int, int]] = {
    "angry": (3190, 805, 958),
    "disgust": (362, 74, 111),
    "fear": (3318, 779, 1024),
    "happy": (5770, 1445, 1774),
    "sad": (3859, 971, 1247),
    "surprise": (2487, 684, 831),
    "neutral": (3981, 984, 1233),
}
STUDY_CLASS_NAMES = {
    "angry": "Anger",
    "disgust": "Disgust",
    "fear": "Fear",
    "happy": "Happiness",
    "sad": "Sadness",
    "surprise": "Surprise",
    "neutral": "Neutral",
}

# The ensemble accuracy the study quotes (§6, Table 3, from its reference [2]).
STUDY_ENSEMBLE_ACC = 75.8


def describe_network(model_cfg: Mapping[str, Any], num_classes: int = 7) -> str:
    """Table 2's "Network configuration", read off the model the config builds."""
    from omegaconf import OmegaConf

    from fer_sweep.core.config import validate
    from fer_sweep.core.models import build_model, describe

    try:  # through the schema, as at training time
        model = validate(OmegaConf.create({"model": dict(model_cfg)})).model
        return describe(build_model(model, num_classes=num_classes))
    except Exception as err:  # a run logged by an older / newer model schema
        return f"? ({model_cfg.get('name', 'model')}: {err})"


def _num(value: Any) -> str:
    return f"{float(value):g}"


def describe_transforms(tcfg: Mapping[str, Any]) -> str:
    """Table 2's "Transformations", in torchvision's words, e.g. "Normalize, RandomRotation(10),
    RandomAffine(degrees=0, translate=(0.1, 0.1))"."""
    parts = ["Normalize"]
    rot = tcfg.get("rotation") or 0
    if isinstance(rot, (list, tuple)):
        if any(float(r) for r in rot):
            parts.append(f"RandomRotation(({_num(rot[0])}, {_num(rot[1])}))")
    elif float(rot):
        parts.append(f"RandomRotation({_num(rot)})")
    tr = tcfg.get("translate") or 0
    pair = tuple(tr) if isinstance(tr, (list, tuple)) else (tr, tr)
    if any(float(t) for t in pair):
        parts.append(f"RandomAffine(degrees=0, translate=({_num(pair[0])}, {_num(pair[1])}))")
    if tcfg.get("hflip"):
        parts.append("RandomHorizontalFlip(0.5)")
    return ", ".join(parts)
