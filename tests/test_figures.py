"""Tests for fer_sweep.figures: the metrics against hand-computed values and sklearn, and every
figure written as a real, non-blank PNG of the expected pixel size (figsize x DPI)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fer_sweep.core import figures as F

CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def _png(path: Path) -> Image.Image:
    """Assert ``path`` is a valid, non-blank PNG and return it loaded."""
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()  # checks the file's structure; the image must be reopened afterwards
    im = Image.open(path)
    assert im.format == "PNG"
    assert im.width > 100 and im.height > 100
    pixels = np.asarray(im.convert("L"), dtype=float)
    assert pixels.std() > 1.0, "image is blank"
    return im


# --------------------------------------------------------------------------- metrics

# true:  0 0 0 1 1 2 2 2 2
# pred:  0 1 0 1 2 2 2 0 2
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2]


def test_confusion_counts_hand_example() -> None:
    cm = F.confusion_counts(np.array(Y_TRUE), np.array(Y_PRED), 4)
    expected = np.array([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, expected)


def test_confusion_counts_accepts_tensors_and_lists() -> None:
    from_tensor = F.confusion_counts(torch.tensor(Y_TRUE), torch.tensor(Y_PRED), 3)
    from_list = F.confusion_counts(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(from_tensor, from_list)
    assert from_tensor.sum() == len(Y_TRUE)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        ([0, 1], [0, 3], "outside"),
        ([0, -1], [0, 1], "outside"),
        ([0, 1, 2], [0, 1], "length"),
        ([[0, 1]], [[0, 1]], "1-D"),
        ([0.5, 1.0], [0, 1], "integer"),
    ],
)
def test_confusion_counts_rejects_bad_labels(y_true, y_pred, match) -> None:
    with pytest.raises(ValueError, match=match):
        F.confusion_counts(y_true, y_pred, 3)


def test_per_class_accuracy_hand_example_and_absent_class() -> None:
    acc = F.per_class_accuracy(Y_TRUE, Y_PRED, 4)
    assert acc[:3] == pytest.approx([2 / 3, 1 / 2, 3 / 4])
    assert math.isnan(acc[3])


def test_macro_f1_hand_example() -> None:
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 1, fp 1, fn 1 -> 2/4;
    # class 2: tp 3, fp 1, fn 1 -> 6/8; class 3: never seen -> excluded.
    expected = (4 / 6 + 2 / 4 + 6 / 8) / 3
    assert F.macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(expected)


def test_macro_f1_counts_predicted_only_class_as_zero() -> None:
    # class 2 is predicted once but never true: it has F1 0 and stays in the mean.
    assert F.macro_f1([0, 0, 1], [0, 2, 1], 3) == pytest.approx((2 / 3 + 1 + 0) / 3)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    # Seeds 0-1 draw from 5 of 7 classes so absent classes are exercised.
    hi = 5 if seed < 2 else 7
    y_true = rng.integers(0, hi, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, 7, n))
    expected = metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert F.macro_f1(torch.from_numpy(y_true), y_pred, 7) == pytest.approx(expected)


def test_macro_f1_empty_is_nan() -> None:
    assert math.isnan(F.macro_f1([], [], 7))


# --------------------------------------------------------------------------- learning curves


def _history(n: int) -> dict[str, list[float]]:
    e = np.arange(n)
    return {
        "train_loss": list(1.8 * np.exp(-e / 10) + 0.2),
        "val_loss": list(1.6 * np.exp(-e / 12) + 0.5),
        "train_acc": list(0.3 + 0.5 * (1 - np.exp(-e / 8))),
        "val_acc": list(0.3 + 0.3 * (1 - np.exp(-e / 8))),
        "lr": [0.01] * (n // 2) + [0.001] * (n - n // 2),
    }


def test_learning_curves_writes_png(tmp_path: Path) -> None:
    out = F.learning_curves(_history(40), tmp_path / "sub" / "curves.png", "run 1", best_epoch=25)
    assert out == tmp_path / "sub" / "curves.png"
    im = _png(out)
    assert im.width > im.height  # two panels side by side
    assert im.size == (11 * F.DPI, round(4.2 * F.DPI))
    assert not list(out.parent.glob(".*tmp")), "temporary file left behind"


def test_learning_curves_one_epoch_and_tensor_values(tmp_path: Path) -> None:
    h = {k: torch.tensor(v[:1]) for k, v in _history(1).items()}
    _png(F.learning_curves(h, tmp_path / "one.png", best_epoch=0))


def test_learning_curves_without_optional_keys(tmp_path: Path) -> None:
    h = {k: v for k, v in _history(5).items() if k in ("val_acc", "val_loss")}
    h["val_loss"][2] = float("nan")  # a diverged epoch leaves a gap, not a crash
    _png(F.learning_curves(h, tmp_path / "val_only.png"))


@pytest.mark.parametrize("best", [-1, 3])
def test_learning_curves_rejects_best_epoch_outside_history(tmp_path: Path, best: int) -> None:
    with pytest.raises(ValueError, match="best_epoch"):
        F.learning_curves(_history(3), tmp_path / "bad.png", best_epoch=best)
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- confusion matrix


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(tmp_path: Path, normalize: bool) -> None:
    rng = np.random.default_rng(0)
    y_true = torch.from_numpy(rng.integers(0, 7, 300))
    y_pred = rng.integers(0, 7, 300)
    out = F.confusion_matrix(y_true, y_pred, CLASSES, tmp_path / "cm.png", "test", normalize)
    im = _png(out)
    assert 0.8 < im.width / im.height < 1.5  # square-ish heatmap plus colour bar


def test_confusion_matrix_with_absent_class(tmp_path: Path) -> None:
    # 'disgust' never occurs: its row must be skipped, not divided by zero.
    y = np.array([0, 2, 3, 4, 5, 6, 0])
    _png(F.confusion_matrix(y, y[::-1].copy(), CLASSES, tmp_path / "cm.png"))


def test_confusion_matrix_rejects_label_beyond_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        F.confusion_matrix([0, 7], [0, 1], CLASSES, tmp_path / "cm.png")


# --------------------------------------------------------------------------- panels


def _panel_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """angry: 3 images, 2 mistaken for neutral, 1 for fear, none correct;
    disgust: 1 image mistaken for angry; happy: all correct (no panel);
    neutral: 2 correct. Other classes absent."""
    y_true = np.array([0, 0, 0, 1, 3, 3, 6, 6, 0])
    y_pred = np.array([6, 2, 0, 0, 3, 3, 6, 6, 6])
    #                   ^  ^  angry correct at index 2
    images = (np.arange(len(y_true))[:, None, None] * 25 + np.zeros((1, 48, 48))).astype(np.uint8)
    images[:, :24] //= 2  # non-uniform tiles so blankness checks mean something
    return images, y_true, y_pred


def test_misclassification_choices() -> None:
    _, y_true, y_pred = _panel_data()
    choices = F.misclassification_choices(y_true, y_pred, 7)
    assert choices == [
        # angry -> neutral twice (beats fear once); first such index 0; neutral example 6;
        # the only correct angry is index 2.
        F.PanelChoice(true_class=0, predicted_class=6, n_confused=2, left=6, middle=0, right=2),
        # disgust -> angry; index 2 is the correct angry example; no disgust is correct.
        F.PanelChoice(true_class=1, predicted_class=0, n_confused=1, left=2, middle=3, right=None),
    ]


def test_misclassification_choices_tie_goes_to_lower_class() -> None:
    choices = F.misclassification_choices([4, 4, 4], [5, 1, 4], 7)
    assert [(c.true_class, c.predicted_class, c.middle) for c in choices] == [(4, 1, 1)]


def test_misclassification_panels_files(tmp_path: Path) -> None:
    images, y_true, y_pred = _panel_data()
    out_dir = tmp_path / "new" / "panels"
    paths = F.misclassification_panels(
        torch.from_numpy(images)[:, None], torch.from_numpy(y_true), y_pred, CLASSES, out_dir
    )
    assert paths == [out_dir / "misclassified_angry.png", out_dir / "misclassified_disgust.png"]
    for p in paths:
        im = _png(p)
        assert im.width > 2 * im.height  # 1x3 strip
    assert sorted(out_dir.iterdir()) == sorted(paths)  # nothing for happy/neutral/absent


def test_misclassification_panels_no_mistakes(tmp_path: Path) -> None:
    y = np.array([0, 1, 2])
    images = np.zeros((3, 48, 48), np.uint8)
    assert F.misclassification_panels(images, y, y, CLASSES, tmp_path / "p") == []
    assert list((tmp_path / "p").iterdir()) == []


def test_misclassification_panels_rejects_image_count_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images"):
        F.misclassification_panels(
            np.zeros((2, 48, 48), np.uint8), [0, 1, 2], [1, 1, 2], CLASSES, tmp_path
        )


# --------------------------------------------------------------------------- comparisons


def test_accuracy_bars(tmp_path: Path) -> None:
    labels = [
        "Conv2d-10-3x3, MaxPool2d-2x2, Conv2d-20-3x3, MaxPool2d-2x2, Linear-720-300, "
        "Linear-300-150, Linear-150-7 | Normalize",
        "ResNet + augmentation",
        "new variant",
    ]
    out = F.accuracy_bars(labels, [0.51, 0.64, 0.58], [52.6, 65.9, None], tmp_path / "b.png", "t")
    im = _png(out)
    assert im.width == 10 * F.DPI


def test_accuracy_bars_grows_with_rows(tmp_path: Path) -> None:
    few = _png(F.accuracy_bars(["a", "b"], [0.5, 0.6], [50, 60], tmp_path / "few.png"))
    many = _png(
        F.accuracy_bars(
            [f"row {i}" for i in range(12)], [0.5] * 12, [None] * 12, tmp_path / "many.png"
        )
    )
    assert many.height > few.height


def test_accuracy_bars_percent_scaling() -> None:
    np.testing.assert_allclose(F._as_percent(np.array([0.5, np.nan, 0.61])), [50, np.nan, 61])
    np.testing.assert_allclose(F._as_percent(np.array([52.6, 63.3])), [52.6, 63.3])


def test_accuracy_bars_rejects_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="length"):
        F.accuracy_bars(["a", "b"], [0.5], [None, None], tmp_path / "b.png")


def test_overlay_curves(tmp_path: Path) -> None:
    curves = {f"lr={10**-i}": list(0.3 + 0.05 * np.arange(10 + i)) for i in range(3)}
    curves["one epoch"] = [0.4]
    im = _png(F.overlay_curves(curves, tmp_path / "o.png", title="val acc"))
    assert im.size == (9 * F.DPI, round(4.8 * F.DPI))


def test_overlay_curves_many_runs_and_empty(tmp_path: Path) -> None:
    many = {f"run {i}": torch.linspace(0.2, 0.6 + i / 100, 25) for i in range(15)}
    _png(F.overlay_curves(many, tmp_path / "many.png"))
    _png(F.overlay_curves({}, tmp_path / "empty.png"))
