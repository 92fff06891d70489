"""experiment=fast and the generic pieces it is made of: the stride-2 stem, label smoothing, the
per-step one-cycle schedule, weight averaging, batched random erasing, and the sealed test split."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from fer_sweep.core.augment import BatchTransform, make_transform, random_crop, random_erase
from fer_sweep.core.config import Config
from fer_sweep.core.data import load_dataset
from fer_sweep.core.dataset import SealedSplit
from fer_sweep.core.evaluate import evaluate, tta_views
from fer_sweep.core.models import build_model, count_parameters, describe, resnet, summary
from fer_sweep.core.train import (
    fit,
    make_scheduler,
    per_step,
    train_epoch,
    train_step,
    weight_average,
)
from fer_sweep.errors import ConfigError, DataError, FerSweepError
from fer_sweep.sweep import job
from fer_sweep.sweep.compose import CONF_DIR, compose_config
from tests.conftest import migrated_store, run_cli

# The recipe's own net is ~1 s a step here; tests of training behaviour (the weight average, the
# schedule, crops, the sealed test split) train the same kind of net, two stages of 8-16 channels.
SMALL_NET = "model.stages=[{channels:8,blocks:1,stride:1},{channels:16,blocks:1,stride:2}]"


def _conf(root: Path, *overrides: str) -> Config:
    return compose_config(
        [
            "experiment=fast",
            f"data.root='{root}'",
            "data=synthetic",
            "trainer.device=cpu",
            "trainer.progress=false",
            *overrides,
        ]
    )


# --------------------------------------------------------------------------- the model


def test_stride_two_stem_halves_the_resolution() -> None:
    net = resnet(
        stem_channels=8,
        stem_stride=2,
        stages=[{"channels": 8, "blocks": 1, "stride": 1}, {"channels": 16, "blocks": 1}],
        pool_size=1,
        hidden=[],
    )
    rows = summary(net)
    assert rows[0][1] == [-1, 8, 24, 24]  # the stem's Conv2d
    assert rows[-1][1] == [-1, 7]
    plain = resnet(stem_channels=8, stages=[{"channels": 8, "blocks": 1}], pool_size=1, hidden=[])
    assert summary(plain)[0][1] == [-1, 8, 48, 48]


@pytest.mark.parametrize(
    ("option", "blocks", "params"),
    [
        ("resnet_fast", "ResBlock-32, ResBlock-64, ResBlock-128, ResBlock-256", 1_227_623),
        ("resnet_fast_wide", "ResBlock-48, ResBlock-96, ResBlock-192, ResBlock-384", 2_758_423),
        (
            "resnet_fast_deep",
            "ResBlock-32, ResBlock-64, ResBlock-128 (x2), ResBlock-256 (x2)",
            2_703_719,
        ),
        (
            "resnet_fast_deeper",
            "ResBlock-32, ResBlock-64, ResBlock-128 (x3), ResBlock-256 (x2)",
            2_999_143,
        ),
    ],
)
def test_the_fast_nets_are_the_documented_ones(
    tmp_path: Path, option: str, blocks: str, params: int
) -> None:
    model = build_model(_conf(tmp_path, f"model={option}").model)
    assert count_parameters(model) == params
    widths = re.findall(r"ResBlock-(\d+)", blocks)
    stem, last = widths[0], widths[-1]  # the stem is as wide as the first stage
    assert describe(model) == f"Conv2d-{stem}-3x3, BatchNorm2d-{stem}, {blocks}, Linear-{last}-7"
    assert summary(model)[-2][1] == [-1, int(last), 3, 3]  # the last block works on 3x3 maps


def test_experiment_fast_is_the_chosen_recipe(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    assert (conf.model.name, conf.transforms.name, conf.scheduler.name) == (
        "resnet_fast_deep",
        "aug_flip",
        "onecycle",
    )
    assert conf.trainer.epochs == 60 and conf.trainer.time_budget_min == 29
    assert conf.trainer.batch_size == 512
    assert conf.optimizer.lr == 0.4 and conf.data.val_fraction == 0.1
    assert conf.trainer.label_smoothing == 0.1 and conf.trainer.ema_decay == 0.995
    assert (conf.eval.tta, conf.eval.tta_shift) == ("flip_x_shift", 3)


def test_experiment_fast43_is_the_searched_trial_on_the_recipe(tmp_path: Path) -> None:
    """experiment=fast43: the search's trial 12 exactly as its 3 seeds ran (docs/fast-log.md,
    round 13), 43 fixed epochs, everything else the recipe's."""
    fast = _conf(tmp_path)
    conf = _conf(tmp_path, "experiment=fast43")
    searched = {
        "optimizer.lr": 0.26135961589650064,
        "optimizer.weight_decay": 0.00032955792061339993,
        "trainer.label_smoothing": 0.06046743135607286,
        "trainer.ema_decay": 0.990232083729765,
        "scheduler.warmup": 0.31959982413757504,
        "trainer.epochs": 43,
        "trainer.time_budget_min": None,
    }
    for key, value in searched.items():
        group, name = key.split(".")
        assert getattr(getattr(conf, group), name) == value, key
    assert (conf.model, conf.transforms, conf.eval, conf.data) == (
        fast.model,
        fast.transforms,
        fast.eval,
        fast.data,
    )
    assert conf.trainer.batch_size == fast.trainer.batch_size == 512


def test_stem_stride_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stem_stride"):
        _conf(tmp_path, "model.stem_stride=0")


# --------------------------------------------------------------------------- test-time views


def test_tta_views_shift_by_the_configured_pixels_and_mirror() -> None:
    x = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    assert [len(list(tta_views(x, m))) for m in ("flip", "shift", "flip_shift")] == [2, 5, 6]
    views = list(tta_views(x, "flip_x_shift", shift=2))
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))
    # identity, then up/down/left/right shifts of 2 pixels, zero-filled, each followed by its mirror
    down = F.pad(x, (0, 0, 2, 0))[..., :6, :]  # content moved 2 rows down
    shifted = [views[i] for i in (2, 4, 6, 8)]
    assert any(torch.equal(v, down) for v in shifted)
    assert all(torch.equal(views[i + 1], views[i].flip(-1)) for i in (2, 4, 6, 8))
    assert all((v == 0).sum() == 2 * 6 * 2 for v in shifted)  # 2 lines of 6 per image filled
    # the default of 2 pixels keeps flip_shift's views as they were
    assert torch.equal(list(tta_views(x, "flip_shift"))[2], list(tta_views(x, "shift", 2))[1])
    three = list(tta_views(x, "shift", shift=3))
    assert all((v == 0).sum() == 2 * 6 * 3 for v in three[1:])


def test_tta_loss_is_that_of_the_averaged_probabilities() -> None:
    """test_loss_tta scores what test_acc_tta scores: the mean of the views' softmaxes."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 7, (20,))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    tfm = make_transform(None, 0.5, 0.25)
    out = evaluate(model, (x, y), tfm, 8, torch.device("cpu"), tta="flip")
    views = list(tta_views(tfm(x, train=False), "flip"))
    mean = torch.stack([model(v).softmax(1) for v in views]).mean(0)
    assert out["loss"] == pytest.approx(F.nll_loss(mean.log(), y).item(), rel=1e-5)
    assert out["loss"] != pytest.approx(F.cross_entropy(model(views[0]), y).item(), rel=1e-3)
    plain = evaluate(model, (x, y), tfm, 8, torch.device("cpu"))
    assert plain["loss"] == pytest.approx(F.cross_entropy(model(views[0]), y).item(), rel=1e-5)


@pytest.mark.parametrize("override", ["eval.tta=ten_crop", "eval.tta_shift=0"])
def test_tta_settings_are_checked(tmp_path: Path, override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        _conf(tmp_path, override)


# --------------------------------------------------------------------------- the loss


def test_label_smoothing_reaches_the_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 48, 48), torch.randint(0, 7, (16,))
    losses = {}
    for eps in (0.0, 0.2):
        torch.manual_seed(1)
        net = resnet(stem_channels=4, stages=[{"channels": 4, "blocks": 1}], pool_size=1, hidden=[])
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        with torch.no_grad():
            expected = F.cross_entropy(net(x), y, label_smoothing=eps)
        losses[eps], _ = train_step(net, opt, x, y, "fp32", eps)
        assert losses[eps].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses[0.2].item() != pytest.approx(losses[0.0].item(), rel=1e-3)


def test_label_smoothing_out_of_range_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.label_smoothing=1.0 must lie in \[0, 1\)"):
        _conf(tmp_path, "trainer.label_smoothing=1.0")


# --------------------------------------------------------------------------- weight averaging


class _Recording(torch.optim.SGD):
    """SGD that keeps a copy of the weights and batch-norm statistics after every step."""

    def __init__(self, net: torch.nn.Module, lr: float) -> None:
        super().__init__(net.parameters(), lr=lr, momentum=0.9)
        self.net, self.seen = net, []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        out = super().step(closure)
        tensors = [*self.net.parameters(), *self.net.buffers()]
        self.seen.append([t.detach().clone() for t in tensors if t.is_floating_point()])
        return out


def test_weight_average_takes_in_every_optimizer_step() -> None:
    torch.manual_seed(0)
    net = resnet(stem_channels=4, stages=[{"channels": 4, "blocks": 1}], pool_size=1, hidden=[])
    x, y = torch.randint(0, 256, (40, 1, 48, 48), dtype=torch.uint8), torch.randint(0, 7, (40,))
    opt, ema = _Recording(net, lr=0.5), weight_average(net, 0.8)
    assert weight_average(net, 0.0) is None
    train_epoch(net, opt, x, y, make_transform(None, 128.0, 64.0), 8, ema=ema)
    assert len(opt.seen) == 5
    expected = opt.seen[0]  # the first step's weights, then 0.8 * average + 0.2 * new
    for weights in opt.seen[1:]:
        expected = [0.8 * e + 0.2 * w for e, w in zip(expected, weights, strict=True)]
    averaged = [
        t for t in (*ema.module.parameters(), *ema.module.buffers()) if t.is_floating_point()
    ]
    for got, want in zip(averaged, expected, strict=True):
        torch.testing.assert_close(got, want)  # parameters and running means and variances
    assert not torch.equal(averaged[0], opt.seen[-1][0])  # not simply the last weights


def test_weight_average_is_what_the_run_keeps_and_leaves_training_alone(
    synthetic_root: Path,
) -> None:
    base = ("trainer.epochs=1", "trainer.batch_size=32", "trainer.amp=fp32", SMALL_NET)
    data = load_dataset(_conf(synthetic_root, *base).data)
    plain = fit(_conf(synthetic_root, *base, "trainer.ema_decay=0"), data)
    avg = fit(_conf(synthetic_root, *base, "trainer.ema_decay=0.9"), data)
    assert plain.raw_model is None and avg.raw_model is not None
    # the same training: the average draws no random numbers and touches no weight
    assert avg.state.history["train_loss"] == plain.state.history["train_loss"]
    raw, averaged = avg.raw_model.state_dict(), avg.model.state_dict()
    for k, v in plain.model.state_dict().items():
        assert torch.equal(raw[k], v)
    # validated, kept and returned: the average
    assert avg.state.history["val_loss"] != plain.state.history["val_loss"]
    assert avg.state.best_weights is not None
    for k, v in avg.state.best_weights.items():
        assert torch.equal(v, averaged[k])
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)


def test_val_raw_scores_the_unaveraged_weights_every_epoch(synthetic_root: Path) -> None:
    """trainer.val_raw: the last weights' validation beside the average's, every epoch, without
    changing the training or what is kept; without an average it is the validation itself."""
    base = ("trainer.epochs=2", "trainer.batch_size=32", "trainer.amp=fp32", SMALL_NET)
    data = load_dataset(_conf(synthetic_root, *base).data)
    avg = fit(_conf(synthetic_root, *base, "trainer.ema_decay=0.9", "trainer.val_raw=true"), data)
    plain = fit(_conf(synthetic_root, *base, "trainer.ema_decay=0", "trainer.val_raw=true"), data)
    h, plain_h = avg.state.history, plain.state.history
    assert h["train_loss"] == plain_h["train_loss"]  # the same training
    # the averaged run's raw weights are the plain run's weights (the average touches none)
    assert h["val_loss_raw"] == plain_h["val_loss"] and h["val_acc_raw"] == plain_h["val_acc"]
    assert h["val_loss_raw"] != h["val_loss"] and len(h["val_loss_raw"]) == 2
    for avg_k, raw_k in (("val_loss", "val_loss_raw"), ("val_acc", "val_acc_raw")):
        assert plain_h[raw_k] == plain_h[avg_k]
    # what is kept is still the average (val_raw only scores)
    for k, v in avg.state.best_weights.items():
        assert torch.equal(v, avg.model.state_dict()[k])


def test_weight_average_resumes_exactly(synthetic_root: Path, tmp_path: Path) -> None:
    base = ("trainer.epochs=3", "trainer.batch_size=32", "trainer.checkpoint_every_s=0", SMALL_NET)
    conf = _conf(synthetic_root, *base, "trainer.ema_decay=0.9")
    data = load_dataset(conf.data)
    straight = fit(conf, data)

    class Cut(Exception):
        pass

    def cut_after_epoch_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Cut

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Cut):
        fit(conf, data, checkpoint=ckpt, on_epoch=cut_after_epoch_two)
    resumed = fit(conf, data, checkpoint=ckpt, resume=True)
    for key in ("train_loss", "val_loss", "val_acc", "lr"):  # all but the seconds
        assert resumed.state.history[key] == straight.state.history[key]
    for a, b in zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)

    # a checkpoint written without an average cannot continue as a run with one
    def cut_after_epoch_one(epoch: int, metrics: dict[str, float]) -> None:
        raise Cut

    plain = tmp_path / "plain.pt"
    with pytest.raises(Cut):
        fit(
            _conf(synthetic_root, *base, "trainer.ema_decay=0"),
            data,
            checkpoint=plain,
            on_epoch=cut_after_epoch_one,
        )
    with pytest.raises(FerSweepError, match="holds no weight average"):
        fit(conf, data, checkpoint=plain, resume=True)


def test_ema_decay_out_of_range_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.ema_decay=1.0 must lie in \[0, 1\)"):
        _conf(tmp_path, "trainer.ema_decay=1.0")


# --------------------------------------------------------------------------- one-cycle


def test_onecycle_warms_up_peaks_and_anneals_per_step(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "optimizer.lr=0.1", "scheduler.warmup=0.25")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=conf.optimizer.lr, momentum=0.9)
    sched = make_scheduler(opt, conf.scheduler, epochs=4, steps_per_epoch=10)
    assert per_step(sched)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(40):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1 / 25)
    peak = max(range(40), key=lambda i: lrs[i])
    assert lrs[peak] == pytest.approx(0.1) and 9 <= peak <= 10  # 25 % of 40 steps
    assert lrs[39] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)
    assert opt.param_groups[0]["momentum"] == 0.9  # no momentum cycle


def test_fit_steps_onecycle_once_per_optimizer_step(synthetic_root: Path) -> None:
    """The schedule spans exactly the run: OneCycleLR raises if stepped past its total."""
    conf = _conf(synthetic_root, "trainer.epochs=3", "trainer.batch_size=16", SMALL_NET)
    data = load_dataset(conf.data)
    result = fit(conf, data)
    steps = math.ceil(len(data.train) / 16)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=conf.optimizer.lr)
    sched = make_scheduler(opt, conf.scheduler, epochs=3, steps_per_epoch=steps)
    expected = []
    for _ in range(3):
        for _ in range(steps):
            opt.step()
            sched.step()
        expected.append(opt.param_groups[0]["lr"])  # the rate after each epoch's last step
    assert result.state.history["lr"] == pytest.approx(expected)


def test_onecycle_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduler.warmup=1.5"):
        _conf(tmp_path, "scheduler.warmup=1.5")
    with pytest.raises(ConfigError, match="div_factor"):
        _conf(tmp_path, "scheduler.div_factor=0.5")


# --------------------------------------------------------------------------- random erasing


def test_random_erase_sets_one_box_per_chosen_image_to_zero() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 1, 48, 48) + 10.0  # no pixel is 0 before erasing
    out = random_erase(x, p=1.0, scale=(0.02, 0.33))
    zero = out[:, 0] == 0
    areas = zero.flatten(1).sum(1).float() / (48 * 48)
    assert bool((areas > 0).all())
    assert 0.015 <= areas.min().item() and areas.max().item() <= 0.36
    for img in zero[:50]:  # one axis-aligned box: its bounding box is full
        rows, cols = img.any(1).nonzero(), img.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert img.sum() == h * w
    assert len({tuple(a.nonzero()[0].tolist()) for a in zero}) > 300  # each image its own box
    assert torch.equal(out[~zero.unsqueeze(1)], x[~zero.unsqueeze(1)])  # the rest untouched


def test_random_erase_probability() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 1, 48, 48)
    erased = (random_erase(x, p=0.5) == 0).flatten(1).any(1).float().mean().item()
    assert 0.46 < erased < 0.54
    assert torch.equal(random_erase(x[:10], p=0.0), x[:10])


def test_erasing_transform_is_train_only_and_seeded(tmp_path: Path) -> None:
    tfm = make_transform(_conf(tmp_path, "transforms=aug_erase").transforms, 0.5, 0.25)
    assert tfm.is_random and tfm.erase == 0.5 and tfm.hflip
    imgs = torch.randint(1, 255, (64, 48, 48), dtype=torch.uint8)
    assert torch.equal(tfm(imgs, train=False), tfm.normalize(imgs))
    torch.manual_seed(3)
    a = tfm(imgs)
    torch.manual_seed(3)
    assert torch.equal(a, tfm(imgs))
    only_erase = BatchTransform(0.5, 0.25, erase=1.0)
    assert only_erase.is_random and not only_erase.warps_images
    assert (only_erase(imgs) == 0).flatten(1).any(1).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("transforms.erase=1.5", "transforms.erase=1.5 is a probability"),
        ("transforms.erase_scale=[0.5,0.1]", "transforms.erase_scale"),
    ],
)
def test_erasing_settings_are_checked(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _conf(tmp_path, override)


# --------------------------------------------------------------------------- the test split


def test_sealed_test_split_knows_its_size_but_refuses_reads(synthetic_root: Path) -> None:
    conf = _conf(synthetic_root)
    data = load_dataset(conf.data)
    sealed = data.sealed()
    assert isinstance(sealed.test, SealedSplit) and len(sealed.test) == len(data.test)
    for name in ("x", "y", "usage"):
        with pytest.raises(DataError, match="test split was read"):
            getattr(sealed.test, name)
    assert sealed.train is data.train and sealed.val is data.val
    fit(_conf(synthetic_root, "trainer.epochs=1", SMALL_NET), sealed)  # training never needs it


def test_a_job_trains_on_sealed_data_and_tests_after(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The code path of `python -m fer_sweep`: fit gets the sealed dataset; the test split is
    read only by log_results, after fit has returned."""
    events: list[str] = []
    real_fit, real_log = job.fit, job.log_results

    def spy_fit(conf, data, **kw):  # type: ignore[no-untyped-def]
        with pytest.raises(DataError):
            getattr(data.test, "x")  # noqa: B009 (the read that must fail)
        events.append("fit")
        return real_fit(conf, data, **kw)

    def spy_log(client, run_id, conf, cfg, data, result):  # type: ignore[no-untyped-def]
        events.append("test")
        return real_log(client, run_id, conf, cfg, data, result)

    monkeypatch.setattr(job, "fit", spy_fit)
    monkeypatch.setattr(job, "log_results", spy_log)
    uri = migrated_store(tmp_path / "mlflow.db")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "experiment=fast",
                "data=synthetic",
                f"data.root='{synthetic_root}'",
                "trainer.epochs=1",
                "trainer.batch_size=32",  # the budget still times its steps, 32 images each
                SMALL_NET,
                "trainer.progress=false",
                "trainer.ema_decay=0.5",
                f"trainer.checkpoint_dir='{tmp_path / 'ckpt'}'",
                f"mlflow.tracking_uri={uri}",
                "mlflow.figures=false",
                "mlflow.log_model=false",
            ],
        )
    job.run_job(cfg)
    assert events == ["fit", "test"]
    (run,) = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("fer_sweep").experiment_id]
    )
    assert run.info.status == "FINISHED"
    for key in ("test_acc", "test_acc_tta", "val_acc_tta", "best_val_acc", "val_acc_raw"):
        assert math.isfinite(run.data.metrics[key])


# --------------------------------------------------------------------------- the recipe


@pytest.mark.slow
def test_experiment_fast_runs_one_epoch_from_the_cli(
    tmp_path: Path, data_overrides: list[str]
) -> None:
    """`python -m fer_sweep experiment=fast` as a user runs it, one epoch on a tiny subset
    (real FER2013 when FER2013_ROOT is set)."""
    proc = run_cli(
        [
            "experiment=fast",
            *data_overrides,
            "data.limit_per_class=10",
            "trainer.epochs=1",
            "mlflow.log_model=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fer_sweep").experiment_id])
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    assert p["model.name"].startswith("resnet_fast") and p["scheduler.name"] == "onecycle"
    assert p["trainer.label_smoothing"] == "0.1" and p["eval.tta"] == "flip_x_shift"
    assert p["trainer.ema_decay"] == "0.995"
    assert run.data.tags["mlflow.runName"].endswith("fast")  # SYNTHETIC-fast on fakes
    assert {"test_acc", "test_acc_tta", "val_acc_tta", "val_acc_raw"} <= set(m)


# --------------------------------------------------------------------------- random crops


def test_random_crop_takes_each_image_its_own_window_anywhere() -> None:
    torch.manual_seed(0)
    n, size = 3000, 40
    x = torch.arange(n * 48 * 48, dtype=torch.float32).view(n, 1, 48, 48)  # every pixel unique
    out = random_crop(x, size)
    assert out.shape == (n, 1, size, size)
    # Each crop is the input's window at the offset of its first pixel.
    first = out[:, 0, 0, 0].long() - torch.arange(n) * 48 * 48
    top, left = first // 48, first % 48
    for i in range(0, n, 97):
        t, c = int(top[i]), int(left[i])
        assert torch.equal(out[i], x[i, :, t : t + size, c : c + size])
    # Every one of the 9 x 9 positions, about equally often (torchvision's RandomCrop).
    counts = torch.bincount(top * 9 + left, minlength=81)
    assert len(counts) == 81 and counts.min() > 0.5 * n / 81 and counts.max() < 1.6 * n / 81
    assert torch.equal(random_crop(x[:5], 48), x[:5])  # the full size is the identity


def test_crop_transform_trains_on_crops_evaluates_whole_images(tmp_path: Path) -> None:
    tfm = make_transform(_conf(tmp_path, "transforms=aug_crop").transforms, 0.5, 0.25)
    assert tfm.crop == 40 and tfm.hflip and tfm.translate == (0.0, 0.0) and tfm.is_random
    imgs = torch.randint(1, 255, (64, 48, 48), dtype=torch.uint8)
    assert torch.equal(tfm(imgs, train=False), tfm.normalize(imgs))
    torch.manual_seed(3)
    a = tfm(imgs)
    assert a.shape == (64, 1, 40, 40)
    torch.manual_seed(3)
    assert torch.equal(a, tfm(imgs))
    only_crop = BatchTransform(0.5, 0.25, crop=40)
    assert only_crop.is_random and not only_crop.warps_images
    assert only_crop(imgs).shape == (64, 1, 40, 40)


def test_fit_trains_on_crops_evaluates_whole_images_and_the_budget_times_crops(
    synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pooling resnet trains on 40x40 crops and is evaluated on the 48x48 images; the time
    budget times the step on the crops it will train on."""
    from fer_sweep.core import budget, train

    conf = _conf(
        synthetic_root,
        "transforms=aug_crop",
        "trainer.epochs=1",
        "trainer.batch_size=32",
        SMALL_NET,
    )
    data = load_dataset(conf.data)
    steps: list[tuple[int, ...]] = []
    step = train.train_step

    def spy(m, o, xb, *args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(tuple(xb.shape[-2:]))
        return step(m, o, xb, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", spy)
    budget.measure(conf, data, torch.device("cpu"))
    assert steps and set(steps) == {(40, 40)}
    steps.clear()
    result = fit(conf, data)
    assert set(steps) == {(40, 40)} and len(steps) == math.ceil(len(data.train) / 32)
    seen: list[tuple[int, ...]] = []
    result.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2:]))
    out = evaluate(result.model, data.val, result.tfm, 64, result.device)
    assert set(seen) == {(48, 48)} and 0.0 <= out["acc"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["transforms.crop=-1"], "transforms.crop=-1 must be a size in pixels"),
        (["model=cnn2", "transforms=aug_crop"], "flattens a fixed image size"),
    ],
)
def test_crop_settings_are_checked(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _conf(tmp_path, *overrides)


@pytest.mark.slow  # the CLI end to end
def test_a_crop_larger_than_the_images_fails_before_the_run_exists(
    tmp_path: Path, synthetic_root: Path
) -> None:
    proc = run_cli(
        [
            "experiment=fast",
            "data=synthetic",
            f"data.root='{synthetic_root}'",
            "transforms=aug_crop",
            "transforms.crop=56",
            "trainer.time_budget_min=null",
            "trainer.epochs=1",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "transforms.crop=56 is larger than the 48x48 images" in proc.stderr
    assert "Traceback" not in proc.stderr
    db = tmp_path / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("fer_sweep")
        assert exp is None or not client.search_runs([exp.experiment_id])
