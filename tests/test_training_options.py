"""trainer.amp (precision), early stopping and checkpoint contents, in-process on the synthetic
faces: the config, the loop and the checkpoint, without starting a CLI process."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fer_sweep.core.augment import make_transform
from fer_sweep.core.config import Config
from fer_sweep.core.data import load_dataset
from fer_sweep.core.device import cpu_has_fast_bf16, resolve_precision
from fer_sweep.core.train import at_lr_floor, fit, make_scheduler, train_epoch
from fer_sweep.errors import ConfigError
from fer_sweep.sweep.compose import compose_config

CPU = torch.device("cpu")


def _conf(root: Path, *overrides: str) -> Config:
    return compose_config(
        [
            f"data.root='{root}'",
            "data=synthetic",
            "trainer.device=cpu",
            "trainer.progress=false",
            *overrides,
        ]
    )


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "flags:")
    return set(line.split(":", 1)[1].split())


# --------------------------------------------------------------------------- precision


def test_auto_precision_follows_the_cpu_flags() -> None:
    native = (
        bool({"avx512_bf16", "amx_bf16"} & _cpu_flags()) and torch.backends.mkldnn.is_available()
    )
    assert cpu_has_fast_bf16() == native
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32"
    if torch.backends.mkldnn.is_available():
        assert resolve_precision("bf16", CPU) == "bf16"  # asked for: honoured, even emulated


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("bf16", "bf16"),
        ("fp32", "fp32"),
        ("true", "bf16"),
        ("false", "fp32"),
        ("BF16", "bf16"),
    ],
)
def test_amp_values_and_aliases(tmp_path: Path, value: str, expected: str) -> None:
    assert _conf(tmp_path, f"trainer.amp={value}").trainer.amp == expected


def test_unknown_amp_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.amp='fp16'.*auto.*bf16.*fp32"):
        _conf(tmp_path, "trainer.amp=fp16")


def test_bf16_run_is_deterministic_on_one_cpu(synthetic_root: Path) -> None:
    conf = _conf(synthetic_root, "trainer.amp=bf16", "trainer.epochs=2", "model=cnn2")
    data = load_dataset(conf.data)
    a, b = fit(conf, data), fit(conf, data)
    assert a.precision == "bf16"
    assert a.state.history["train_loss"] == b.state.history["train_loss"]
    assert a.state.history["val_loss"] == b.state.history["val_loss"]


# --------------------------------------------------------------------------- stopping


def test_early_stopping_stops_after_patience_epochs_without_a_better_val_loss(
    synthetic_root: Path,
) -> None:
    # lr 1e-9 leaves the weights unchanged: the validation loss never improves after epoch 1.
    conf = _conf(
        synthetic_root,
        "optimizer.lr=1e-9",
        "trainer.epochs=20",
        "trainer.early_stopping.patience=2",
        "trainer.amp=fp32",
    )
    result = fit(conf, load_dataset(conf.data))
    assert result.state.stop_reason == "early_stopping"
    assert result.state.epoch + 1 == 3  # epoch 1 sets the best, 2 and 3 do not beat it
    assert len(result.state.history["val_loss"]) == 3


def test_stop_at_min_lr_stops_once_the_plateau_scheduler_is_spent(synthetic_root: Path) -> None:
    # patience 0: every epoch without a 1e-4 relative gain cuts the rate 10x; 1e-6 -> 1e-8 is the
    # floor (a further cut would change it by less than the scheduler's eps, 1e-8).
    conf = _conf(
        synthetic_root,
        "optimizer.lr=1e-6",
        "scheduler.patience=0",
        "trainer.epochs=30",
        "trainer.stop_at_min_lr=true",
        "trainer.amp=fp32",
    )
    result = fit(conf, load_dataset(conf.data))
    lrs = result.state.history["lr"]
    assert result.state.stop_reason == "min_lr"
    # epoch 1 sets the best loss, epoch 2 cuts to 1e-7, epoch 3 to the floor 1e-8: stop there
    # (patience 0); the history holds the rate each epoch trained with.
    assert len(lrs) == result.state.epoch + 1 == 3
    assert [round(math.log10(lr)) for lr in lrs] == [-6, -6, -7]


def test_stop_at_min_lr_is_off_by_default_and_needs_the_plateau_scheduler(tmp_path: Path) -> None:
    assert _conf(tmp_path).trainer.stop_at_min_lr is False
    assert _conf(tmp_path).trainer.early_stopping.patience is None
    conf = _conf(tmp_path, "scheduler=cosine")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    assert not at_lr_floor(make_scheduler(opt, conf.scheduler, 10))
    with pytest.raises(ConfigError, match="early_stopping.patience"):
        _conf(tmp_path, "trainer.early_stopping.patience=0")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=resnet_fast", "model.dropout=0.5"], r"model.dropout=0.5 acts after .* has none"),
        (["optimizer.nesterov=true"], r"nesterov=true needs momentum"),
        (["optimizer=adam", "optimizer.momentum=0.9"], r"momentum and optimizer.nesterov are SGD"),
        (["optimizer=adam", "optimizer.betas=[0.9]"], r"betas=\[0.9\] must be two numbers"),
        (["optimizer=adam", "optimizer.betas=[0.9,1.0]"], r"must be two numbers in \[0, 1\)"),
        (["model=resnet", "transforms.crop=64"], r"transforms.crop=64 is larger than the 48x48"),
        (["scheduler=cosine", "trainer.stop_at_min_lr=true"], r"scheduler=cosine has no such"),
    ],
    ids=[
        "dropout_no_head",
        "nesterov",
        "adam_momentum",
        "betas_len",
        "betas_range",
        "crop",
        "floor",
    ],
)
def test_settings_torch_would_ignore_or_refuse_late_are_refused_by_the_schema(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    """Before the data loads and any run opens; a grid's bad job, before its good ones train."""
    with pytest.raises(ConfigError, match=message):
        _conf(tmp_path, *overrides)


# --------------------------------------------------------------------------- checkpoints


def test_cpu_checkpoint_holds_no_cuda_state_and_never_initialises_cuda(
    synthetic_root: Path, tmp_path: Path
) -> None:
    conf = _conf(synthetic_root, "trainer.epochs=1")
    ckpt = tmp_path / "run.pt"
    fit(conf, load_dataset(conf.data), checkpoint=ckpt)
    blob = torch.load(ckpt, weights_only=True)
    assert blob["rng_device"] is None and "rng_cuda" not in blob
    assert isinstance(blob["rng_cpu"], torch.Tensor)
    assert not torch.cuda.is_initialized()


def test_a_stop_between_the_best_weights_and_the_checkpoint_keeps_a_matching_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The best weights and the checkpoint are two files, written one after the other: a
    process stopped between the two writes must leave the weights that the checkpoint's
    best_epoch names (not a later epoch's, which its history no longer holds)."""
    from fer_sweep.core import checkpoint as ck

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    path = tmp_path / "run.pt"

    def save(epoch: int, best_epoch: int) -> None:
        weights = {k: torch.full_like(v, float(best_epoch)) for k, v in net.state_dict().items()}
        state = ck.State(epoch=epoch, best_epoch=best_epoch, best_val_acc=0.1 * best_epoch)
        state.best_weights, state.best_changed = weights, True
        ck.save_checkpoint(path, state, net, opt, None, CPU)

    def best_of(state: ck.State) -> float:
        assert state.best_weights is not None
        return float(state.best_weights["weight"].flatten()[0])

    save(epoch=0, best_epoch=0)
    real = ck._atomic_save

    def killed_at_the_checkpoint(obj: object, target: Path) -> None:
        if target == path:
            raise KeyboardInterrupt  # after the best weights' write, before the checkpoint's
        real(obj, target)

    monkeypatch.setattr(ck, "_atomic_save", killed_at_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        save(epoch=1, best_epoch=1)
    monkeypatch.setattr(ck, "_atomic_save", real)
    state = ck.load_checkpoint(path, net, opt, None, CPU)
    assert (state.epoch, state.best_epoch, best_of(state)) == (0, 0, 0.0)

    save(epoch=2, best_epoch=2)  # the next checkpoint: its best file alone is left
    assert sorted(f.name for f in tmp_path.iterdir()) == ["run.best-3.pt", "run.pt"]
    assert best_of(ck.load_checkpoint(path, net, opt, None, CPU)) == 2.0
    # a checkpoint of older code, whose best weights had no epoch in their name
    ck.best_path(path, 2).rename(tmp_path / "run.best.pt")
    assert best_of(ck.load_checkpoint(path, net, opt, None, CPU)) == 2.0
    ck.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("old_checkpoint", [False, True])
def test_a_resumed_runs_train_seconds_count_every_stretch(
    synthetic_root: Path, tmp_path: Path, old_checkpoint: bool
) -> None:
    """train_seconds of a run resumed from a checkpoint is its whole training, not the last
    process's share; a checkpoint from before the total was kept falls back on its epochs'."""

    class Cut(Exception):
        pass

    def cut_after_two(epoch: int, _: dict[str, float]) -> None:
        if epoch == 1:  # the checkpoint of epochs 1-2 is written before this call
            raise Cut

    ckpt = tmp_path / "run.pt"
    conf = _conf(synthetic_root, "trainer.epochs=4", "trainer.checkpoint_every_s=0")
    data = load_dataset(conf.data)
    with pytest.raises(Cut):
        fit(conf, data, checkpoint=ckpt, on_epoch=cut_after_two)
    blob = torch.load(ckpt, weights_only=True)
    before = sum(blob["history"]["epoch_seconds"])
    assert blob["epoch"] == 1 and blob["seconds"] >= before > 0
    if old_checkpoint:
        del blob["seconds"]
        torch.save(blob, ckpt)
    seen: list[float] = []
    result = fit(
        conf, data, checkpoint=ckpt, resume=True, on_resume=lambda s: seen.append(s.seconds)
    )
    assert seen == [before if old_checkpoint else blob["seconds"]]
    epochs = result.state.history["epoch_seconds"]
    assert len(epochs) == 4 and result.train_seconds >= seen[0] + sum(epochs[2:])
    assert result.train_seconds >= sum(epochs)


# --------------------------------------------------------------------------- torch.compile


class _Sizes(torch.nn.Module):
    """The model, recording the batch sizes it is called with."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return self.net(x)


def test_a_compiled_model_leaves_the_shorter_last_batch_to_its_eager_module() -> None:
    """A compiled graph is for one batch shape: the 4-image last batch of 20 images in batches
    of 8 would compile a second, dynamic-shape graph (~15 s on a CPU), so the uncompiled
    module takes it; both share the weights and the optimizer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48 * 48, 7))
    compiled, eager = _Sizes(net), _Sizes(net)  # stand-ins: the step_model and its module
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randint(0, 256, (20, 1, 48, 48), dtype=torch.uint8), torch.randint(0, 7, (20,))
    tfm = make_transform(None, 128.0, 64.0)
    train_epoch(compiled, opt, x, y, tfm, 8, eager=eager)
    assert compiled.sizes == [8, 8] and eager.sizes == [4]
    alone = _Sizes(net)  # not compiled: one module takes every batch
    train_epoch(alone, opt, x, y, tfm, 8)
    assert alone.sizes == [8, 8, 4]
