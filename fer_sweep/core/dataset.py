"""What FER2013 is once loaded: 48x48 grey images, seven classes, splits as uint8 tensors.

Label order (``CLASSES``) is the Kaggle challenge CSV's ``emotion`` column, 0..6 =
Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral. Image folders are mapped onto it by
folder name, so the same image gets the same label from either format and results stay
comparable with papers that use the CSV. It is *not* the alphabetical order that
torchvision's ImageFolder would use. A leaf module: the readers, the synthetic faces and the
splitting all build on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from fer_sweep.errors import DataError

log = logging.getLogger(__name__)


CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
IMAGE_SIZE = 48

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)


@dataclass
class Split:
    """One split as plain tensors: small enough (83 MB for all of FER2013) to keep in RAM."""

    x: torch.Tensor  # uint8 (N, 48, 48)
    y: torch.Tensor  # int64 (N,)
    usage: torch.Tensor | None = None  # int8 (N,): 0 PublicTest, 1 PrivateTest, -1 unknown
    # where each image came from (test split only): its path relative to the data root
    # ("test/happy/PrivateTest_1.jpg") or "<csv name>:<line>"; what results bundles cite
    ids: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def class_counts(self) -> list[int]:
        """Samples per class in ``CLASSES`` order (zeros included, so always length 7)."""
        return torch.bincount(self.y, minlength=len(CLASSES)).tolist()

    def subset(self, idx: torch.Tensor) -> Split:
        """A copy holding only ``idx`` (indices or a bool mask); copies stay contiguous."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx, as_tuple=True)[0]
        # numpy's gather is several times faster than torch's for this uint8 copy
        i = idx.to(torch.int64).cpu().numpy()
        usage = None if self.usage is None else torch.from_numpy(self.usage.numpy()[i])
        ids = None if self.ids is None else tuple(self.ids[k] for k in i.tolist())
        return Split(
            torch.from_numpy(self.x.numpy()[i]), torch.from_numpy(self.y.numpy()[i]), usage, ids
        )


class SealedSplit:
    """The test split while a model is being trained and chosen: its size is known, any read
    of its images or labels is an error. Every choice (epochs, weights, test-time augmentation)
    is made on the validation split; the test split is for the final numbers only."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getattr__(self, name: str) -> Any:
        raise DataError(
            f"the test split was read (.{name}) before the final evaluation: training and "
            "model selection must use data.train and data.val only."
        )


@dataclass
class Dataset:
    """Train/val/test splits plus the normalisation the model should use."""

    train: Split
    val: Split
    test: Split | SealedSplit
    mean: float
    std: float
    info: dict = field(default_factory=dict)

    def sealed(self) -> Dataset:
        """This dataset with the test split sealed (``SealedSplit``): what training sees."""
        return Dataset(
            self.train, self.val, SealedSplit(len(self.test)), self.mean, self.std, self.info
        )
