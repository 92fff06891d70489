"""Figures and small metrics for reports: learning curves, confusion matrices, the study's
misclassification panels (Figures 3-9 of the reference study), and comparison bars.

Figures are built on ``matplotlib.figure.Figure`` directly, never through pyplot, so nothing
here touches pyplot's global figure registry or the process-wide backend: it is safe to call
from worker threads and joblib processes, and there is no figure to forget to close. PNG output
goes through the Agg renderer, so no display is needed.

Every function accepts numpy arrays, torch tensors (any device) or plain sequences, so callers
can pass what their evaluation loop produced without converting first.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:  # matplotlib loads in ~0.5 s: only a job that draws pays for it (_figure)
    from matplotlib.figure import Figure

DPI = 120

__all__ = [
    "DPI",
    "PanelChoice",
    "accuracy_bars",
    "confusion_counts",
    "confusion_matrix",
    "learning_curves",
    "macro_f1",
    "misclassification_choices",
    "misclassification_panels",
    "overlay_curves",
    "per_class_accuracy",
]


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Convert a tensor (any device, with or without grad) or sequence to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair of label vectors, so a shape or range bug fails loudly here instead
    of silently producing a wrong matrix (np.bincount would just grow it)."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    out = []
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        a = _to_numpy(y)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            if a.dtype == bool or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
                raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels outside [0, {num_classes}): min {a.min()}, max {a.max()}"
            )
        out.append(a)
    if out[0].shape != out[1].shape:
        raise ValueError(f"y_true and y_pred differ in length: {out[0].size} vs {out[1].size}")
    return out[0], out[1]


def _check_classes(classes: Sequence[str], num_classes: int | None = None) -> list[str]:
    names = [str(c) for c in classes]
    if not names:
        raise ValueError("classes must not be empty")
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(f"got {len(names)} class names for {num_classes} classes")
    return names


def _figure(**kwargs: Any) -> Figure:
    """A pyplot-free matplotlib Figure (matplotlib imported on first use)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write a PNG atomically (temp file + rename), so a reader such as the MLflow UI or a
    report builder polling the run directory never sees a half-written image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _epoch_axes(ax: Any, n_epochs: int, ylabel: str) -> None:
    """Epoch x-axis with whole-epoch ticks (every epoch labelled for short runs: MaxNLocator
    alone would put ticks at 0.8, 1.0, 1.2 for a 1-epoch run), a y label and a light grid."""
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    if 0 < n_epochs <= 12:
        ax.set_xticks(range(1, n_epochs + 1))
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if n_epochs:
        ax.set_xlim(0.5, n_epochs + 0.5)


def _pretty(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _slug(name: str) -> str:
    """File-name-safe class name (the canonical names are already safe; others may not be)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """Sequence with optional Nones -> float array with NaN for missing."""
    return np.array([np.nan if v is None else float(v) for v in _to_numpy_list(values)], float)


def _to_numpy_list(values: Any) -> list[Any]:
    if hasattr(values, "detach"):
        return _to_numpy(values).tolist()
    return list(values)


# --------------------------------------------------------------------------- metrics


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class."""
    t, p = _labels(y_true, y_pred, num_classes)
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Unweighted mean of per-class F1, the FER2013 metric that is not flattered by the
    dominant 'happy' class.

    Per class, F1 = 2TP / (2TP + FP + FN), which is 0 when TP = 0 (sklearn's
    ``zero_division=0``). A class that is neither present in ``y_true`` nor ever predicted is
    left out of the mean, because it says nothing about the model; this matches
    ``sklearn.metrics.f1_score(average='macro')`` with its default ``labels`` (the classes seen
    in either vector). Returns NaN for empty input.
    """
    cm = confusion_counts(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    seen = (support + predicted) > 0
    if not seen.any():
        return float("nan")
    f1 = 2 * tp[seen] / (support[seen] + predicted[seen])
    return float(f1.mean())


def per_class_accuracy(y_true: Any, y_pred: Any, num_classes: int) -> list[float]:
    """Recall per class (the diagonal of the row-normalised confusion matrix); NaN for a
    class with no true examples, because 0 would read as 'always wrong'."""
    cm = confusion_counts(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    return [float(cm[i, i] / support[i]) if support[i] else float("nan") for i in range(len(cm))]


# --------------------------------------------------------------------------- learning curves


def learning_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str = "",
    best_epoch: int | None = None,
) -> Path:
    """Accuracy and loss per epoch (the study's Figures 1-2), side by side, so over-fitting
    and the chosen checkpoint are visible at a glance.

    ``history``: 'train_loss', 'val_loss', 'train_acc', 'val_acc' (one value per epoch, index 0
    = epoch 1; accuracies as fractions, drawn as percent) and optionally 'lr', drawn on a log
    axis over the loss. Missing keys are skipped; NaN values leave gaps. ``best_epoch`` is
    0-based and drawn as a dashed vertical line labelled 'best'. Markers are drawn so a
    1-epoch run still shows points.

    Long because a figure's layout (panels, axes, legend, markers) reads best in one place.
    """
    series = {k: _floats(v) for k, v in history.items()}
    n_epochs = max((len(v) for v in series.values()), default=0)
    if best_epoch is not None and not 0 <= int(best_epoch) < max(n_epochs, 1):
        raise ValueError(f"best_epoch {best_epoch} is outside the {n_epochs} recorded epochs")

    fig = _figure(figsize=(11, 4.2), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    marker = "o" if n_epochs <= 30 else None
    panels = (
        (ax_acc, "acc", "accuracy (%)", 100.0),
        (ax_loss, "loss", "loss", 1.0),
    )
    for ax, kind, ylabel, scale in panels:
        for split, color in (("train", "tab:blue"), ("val", "tab:orange")):
            y = series.get(f"{split}_{kind}")
            if y is None or y.size == 0:
                continue
            x = np.arange(1, y.size + 1)
            ax.plot(x, y * scale, color=color, marker=marker, ms=4, label=split)
        _epoch_axes(ax, n_epochs, ylabel)
        if not n_epochs:
            ax.text(
                0.5,
                0.5,
                "no epochs recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        if best_epoch is not None:
            ax.axvline(
                int(best_epoch) + 1,
                color="black",
                ls="--",
                lw=1,
                label=f"best (epoch {int(best_epoch) + 1})",
            )
    ax_acc.set_title("accuracy")
    ax_loss.set_title("loss")

    lr = series.get("lr")
    handles, labels = ax_loss.get_legend_handles_labels()
    if lr is not None and lr.size and np.isfinite(lr).any():
        ax_lr = ax_loss.twinx()
        (line,) = ax_lr.plot(
            np.arange(1, lr.size + 1),
            lr,
            color="tab:green",
            lw=1,
            drawstyle="steps-mid",
            marker="." if lr.size <= 30 else None,
            alpha=0.7,
            label="lr",
        )
        finite = lr[np.isfinite(lr)]
        if (finite > 0).all():
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="tab:green")
        ax_lr.tick_params(axis="y", colors="tab:green")
        handles.append(line)
        labels.append("lr")
    if handles:
        ax_loss.legend(handles, labels, fontsize="small")
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix(
    y_true: Any,
    y_pred: Any,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
    normalize: bool = True,
) -> Path:
    """Heatmap of the confusion matrix (rows = true, columns = predicted).

    With ``normalize`` the colour and the first number in each cell are row percentages
    (recall-style, so the rare 'disgust' row is as readable as 'happy'), with the raw count
    beneath; without it the colour is the count. Rows with no examples are left blank.
    """
    names = _check_classes(classes)
    cm = confusion_counts(y_true, y_pred, len(names))
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        pct = np.where(support > 0, 100.0 * cm / support, np.nan)
    shown = pct if normalize else cm.astype(float)
    vmax = 100.0 if normalize else max(float(cm.max()), 1.0)

    c = len(names)
    side = max(5.0, 0.75 * c + 2.5)
    fig = _figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(shown), cmap="Blues", vmin=0.0, vmax=vmax)
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("% of true class" if normalize else "count")
    labels = [_pretty(n) for n in names]
    ax.set_xticks(range(c), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(c), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fontsize = 9 if c <= 8 else 7
    for i in range(c):
        for j in range(c):
            if support[i, 0] == 0:
                continue
            text = f"{pct[i, j]:.1f}%\n{cm[i, j]}" if normalize else f"{cm[i, j]}"
            dark = shown[i, j] > 0.55 * vmax
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )
    n = int(cm.sum())
    acc = np.trace(cm) / n if n else float("nan")
    subtitle = f"n = {n}, accuracy = {100 * acc:.1f}%"
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle)
    return _save(fig, path)


# --------------------------------------------------------------------------- misclassifications


class PanelChoice(NamedTuple):
    """Which images one misclassification panel shows (indices into the evaluated set)."""

    true_class: int
    predicted_class: int  # the class true_class is most often mistaken for
    n_confused: int  # how many true_class images were predicted as predicted_class
    left: int | None  # a correctly predicted image of predicted_class, or None
    middle: int  # an image of true_class predicted as predicted_class
    right: int | None  # a correctly predicted image of true_class, or None


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def misclassification_choices(y_true: Any, y_pred: Any, num_classes: int) -> list[PanelChoice]:
    """Pick, per true class with at least one mistake, the panel's three images.

    The confusion partner is the most frequent wrong prediction (ties -> lower class index)
    and each image is the first matching index, so reruns on the same data pick the same
    images and panels can be compared across runs.
    """
    t, p = _labels(y_true, y_pred, num_classes)
    cm = confusion_counts(t, p, num_classes)
    choices = []
    for c in range(num_classes):
        wrong = cm[c].copy()
        wrong[c] = 0
        if wrong.sum() == 0:
            continue
        q = int(np.argmax(wrong))
        middle = _first((t == c) & (p == q))
        assert middle is not None  # wrong[q] > 0 guarantees one
        choices.append(
            PanelChoice(
                true_class=c,
                predicted_class=q,
                n_confused=int(wrong[q]),
                left=_first((t == q) & (p == q)),
                middle=middle,
                right=_first((t == c) & (p == c)),
            )
        )
    return choices


def _as_images(images: Any) -> np.ndarray:
    """(N, H, W) array; a singleton channel axis (N, 1, H, W) or (N, H, W, 1) is dropped so
    tensors straight from a DataLoader are accepted."""
    a = _to_numpy(images)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"images must be (N, H, W) grayscale, got shape {a.shape}")
    return a


def _tile(ax: Any, image: np.ndarray | None, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if image is None:
        ax.set_facecolor("0.8")
        ax.text(
            0.5, 0.5, "no example", ha="center", va="center", transform=ax.transAxes, color="0.3"
        )
        ax.set_aspect("equal")
        return
    if image.dtype == np.uint8:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:  # normalised floats: stretch to the image's own range
        ax.imshow(image, cmap="gray", interpolation="nearest")


def misclassification_panels(
    images: Any,
    y_true: Any,
    y_pred: Any,
    classes: Sequence[str],
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """The study's Figures 3-9: one 1x3 panel per true class that has a mistake.

    Left: a correctly predicted example of the class it is most often mistaken for; middle: a
    true-class image predicted as that class; right: a correctly predicted example of the true
    class (grey 'no example' tile where none exists). Writes
    ``out_dir/misclassified_<class>.png`` in class order and returns the paths; classes without
    mistakes get no file. ``images``: uint8 (N, 48, 48) (a singleton channel axis is accepted).
    """
    names = _check_classes(classes)
    imgs = _as_images(images)
    t, p = _labels(y_true, y_pred, len(names))
    if len(imgs) != len(t):
        raise ValueError(f"{len(imgs)} images but {len(t)} labels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    support = np.bincount(t, minlength=len(names))

    paths = []
    for ch in misclassification_choices(t, p, len(names)):
        c, q = names[ch.true_class], names[ch.predicted_class]
        fig = _figure(figsize=(7.5, 3.1), layout="constrained")
        axes = fig.subplots(1, 3)
        _tile(axes[0], None if ch.left is None else imgs[ch.left], f"Predicted: {q} (example)")
        _tile(axes[1], imgs[ch.middle], f"True {c}, predicted {q}")
        _tile(axes[2], None if ch.right is None else imgs[ch.right], f"Actual: {c} (example)")
        fig.suptitle(
            f"Misclassification example for {_pretty(c)} category "
            f"({ch.n_confused} of {support[ch.true_class]} predicted {q})",
            fontsize=11,
        )
        paths.append(_save(fig, out / f"misclassified_{_slug(c)}.png"))
    return paths


# --------------------------------------------------------------------------- comparisons


def _as_percent(values: np.ndarray) -> np.ndarray:
    """Fractions -> percent. A series whose finite values all lie in [0, 1] is read as
    fractions (a 7-class accuracy below 1% is not a realistic percent); otherwise as percent."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.max() <= 1.0:
        return values * 100.0
    return values


def accuracy_bars(
    labels: Sequence[str],
    ours: Sequence[float],
    reference: Sequence[float | None],
    path: str | os.PathLike[str],
    title: str = "",
    intervals: Sequence[tuple[float, float] | None] | None = None,
) -> Path:
    """Grouped horizontal bars, ours vs a reference (e.g. the study's Table 2), per row;
    ``intervals`` (low, high) per row, in the unit of ``ours``, draw error bars on our bars.

    Horizontal so that long labels (whole network descriptions) stay readable; labels are
    wrapped. Each series may be fractions or percent (see ``_as_percent``); it is drawn in
    percent. A None/NaN value draws no bar, and the row is marked 'n/a' for that series.

    Long because a figure's layout (bars, labels, reference marks) reads best in one place.
    """
    names = [str(s) for s in labels]
    a = _as_percent(_floats(ours))
    b = _as_percent(_floats(reference))
    if not len(names) == len(a) == len(b):
        raise ValueError(
            f"labels, ours and reference differ in length: {len(names)}, {len(a)}, {len(b)}"
        )
    wrapped = ["\n".join(textwrap.wrap(s, 45, break_on_hyphens=False)[:4]) or " " for s in names]
    lines = [w.count("\n") + 1 for w in wrapped]
    height = max(2.8, 1.3 + sum(max(0.55, 0.24 * n) for n in lines))
    fig = _figure(figsize=(10, height), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names), dtype=float)
    h = 0.38
    for values, offset, color, label in (
        (a, -h / 2, "tab:blue", "ours"),
        (b, h / 2, "tab:grey", "reference"),
    ):
        ok = np.isfinite(values)
        bars = ax.barh(y[ok] + offset, values[ok], height=h, color=color, label=label)
        spans = [None] * len(values)
        if label == "ours" and intervals is not None:
            spans = [None if iv is None else _as_percent(_floats(iv)) for iv in intervals]
        any_span = any(sp is not None for sp in spans)
        if not any_span:
            ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
        for yi, value, span in zip(y, values, spans, strict=True):
            if span is None or not np.isfinite(value):
                if any_span and np.isfinite(value):
                    ax.text(value + 0.5, yi + offset, f"{value:.1f}%", va="center", fontsize=8)
                continue
            lo, hi = span
            ax.errorbar(
                value,
                yi + offset,
                xerr=[[value - lo], [hi - value]],
                fmt="none",
                ecolor="black",
                capsize=3,
                lw=1,
            )
            ax.text(
                max(value, hi) + 0.5,
                yi + offset,
                f"{value:.1f}% [{lo:.1f}, {hi:.1f}]",
                va="center",
                fontsize=8,
            )
        for yi in y[~ok]:
            ax.text(0.5, yi + offset, "n/a", va="center", fontsize=7, color="0.4")
    ax.set_yticks(y, wrapped, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first row on top, as in a table
    top = np.nanmax(np.concatenate([a, b, [0.0]]))
    ax.set_xlim(0, max(100.0, top * 1.12))
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def overlay_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    ylabel: str = "validation accuracy",
    title: str = "",
) -> Path:
    """Several runs' per-epoch curves on one axis (label -> values, epoch 1-based), to compare
    the runs of a sweep. Values are drawn as given. Up to 10 runs share a compact legend
    inside the plot; more move the legend outside and add line styles so colours may repeat."""
    fig = _figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    items = [(str(k), _floats(v)) for k, v in curves.items()]
    many = len(items) > 10
    styles = ("-", "--", ":", "-.")
    longest = max((v.size for _, v in items), default=0)
    for i, (label, y) in enumerate(items):
        if y.size == 0:
            continue
        ax.plot(
            np.arange(1, y.size + 1),
            y,
            lw=1.4,
            color=f"C{i % 10}",
            ls=styles[(i // 10) % len(styles)],
            marker="o" if y.size <= 1 or longest <= 20 else None,
            ms=3,
            label=label,
        )
    _epoch_axes(ax, longest, ylabel)
    if ax.get_legend_handles_labels()[0]:
        if many:
            fig.legend(loc="outside right upper", fontsize="x-small", ncols=1 + len(items) // 30)
        else:
            ax.legend(fontsize="small")
    else:
        ax.text(
            0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes, color="grey"
        )
    if title:
        ax.set_title(title)
    return _save(fig, path)
