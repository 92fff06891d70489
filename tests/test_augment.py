"""Batched augmentation against torchvision's per-image transforms (exact and statistical)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from fer_sweep.core.augment import BatchTransform, affine_batch, make_transform
from fer_sweep.core.config import TransformsConfig
from fer_sweep.errors import ConfigError

MEAN, STD = 0.50779873, 0.25495943  # the study's FER2013 statistics


def _tv_affine(img: torch.Tensor, angle: float, tx: int, ty: int) -> torch.Tensor:
    return TF.affine(
        img,
        angle=angle,
        translate=[tx, ty],
        scale=1.0,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.NEAREST,
        fill=0,
    )


def _one(x: torch.Tensor, angle: float, tx: float, ty: float, flip: bool | None = None):
    f = None if flip is None else torch.tensor([flip])
    return affine_batch(
        x.unsqueeze(0), torch.tensor([angle]), torch.tensor([tx]), torch.tensor([ty]), f
    )[0]


# ---------------------------------------------------------------------------------------------
# (1) exactness of the deterministic core
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(48, 48), (40, 52)])
def test_integer_translation_equals_torchvision_affine(hw: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(1, *hw, generator=gen)
    for tx, ty in [(0, 0), (3, -2), (-5, 5), (4, 0), (0, -4), (-1, 1)]:
        assert torch.equal(_one(img, 0.0, tx, ty), _tv_affine(img, 0.0, tx, ty)), (tx, ty)


@pytest.mark.parametrize("hw", [(48, 48), (40, 52)])
def test_sampling_grid_equals_affine_grid(hw: tuple[int, int]) -> None:
    """The two-plane grid is F.affine_grid's (pixel centres, align_corners=False) to float32
    rounding, and grid_sample reads it, strided as it is, to the same pixels."""
    import torch.nn.functional as F

    from fer_sweep.core.augment import _affine_grid

    theta = torch.randn(20, 2, 3, generator=torch.Generator().manual_seed(7)) * 0.3
    theta[:, 0, 0] += 1.0
    theta[:, 1, 1] += 1.0
    ours, ref = _affine_grid(theta, *hw), F.affine_grid(theta, [20, 1, *hw], align_corners=False)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    img = torch.randn(20, 1, *hw, generator=torch.Generator().manual_seed(8))
    sample = lambda g: F.grid_sample(img, g, mode="nearest", align_corners=False)  # noqa: E731
    assert (sample(ours) == sample(ref)).float().mean() > 0.9999


def test_positive_translation_moves_right_and_down() -> None:
    img = torch.zeros(1, 9, 9)
    img[0, 4, 4] = 1.0
    assert _one(img, 0.0, 2.0, 1.0)[0, 5, 6] == 1.0


@pytest.mark.parametrize("hw", [(48, 48), (40, 52)])
@pytest.mark.parametrize("angle", [7.3, -9.6, 30.0])
def test_rotation_agrees_with_torchvision(hw: tuple[int, int], angle: float) -> None:
    """Positive angle = counter-clockwise, as RandomRotation / TF.rotate (F.affine's is clockwise).

    Nearest rounding may differ on a few boundary pixels, hence >= 98 % rather than equality.
    """
    img = torch.randn(1, *hw, generator=torch.Generator().manual_seed(1))
    ours = _one(img, angle, 0.0, 0.0)
    assert (
        ours == TF.rotate(img, angle, interpolation=InterpolationMode.NEAREST, fill=0)
    ).float().mean() >= 0.98
    assert (ours == _tv_affine(img, -angle, 0, 0)).float().mean() >= 0.98
    assert (ours == TF.rotate(img, -angle, fill=0)).float().mean() < 0.5  # sign does matter
    # rotation + integer shift in one resampling == torchvision's single affine with both ...
    combined = _one(img, angle, 3.0, -4.0)
    assert (combined == _tv_affine(img, -angle, 3, -4)).float().mean() >= 0.98
    # ... and close to the study's two resamplings (RandomRotation, then RandomAffine), which
    # round twice: on white noise that differs on a few % of pixels, the reason we resample once.
    two_step = _tv_affine(TF.rotate(img, angle, fill=0), 0.0, 3, -4)
    assert (combined == two_step).float().mean() >= 0.9


def test_positive_angle_is_counter_clockwise() -> None:
    img = torch.zeros(1, 9, 9)
    img[0, 4, 8] = 1.0  # right of the centre
    assert _one(img, 90.0, 0.0, 0.0)[0, 0, 4] == 1.0  # -> top


def test_flip_equals_torch_flip_and_comes_first() -> None:
    img = torch.randn(1, 48, 48, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_one(img, 0.0, 0.0, 0.0, flip=True), torch.flip(img, dims=[-1]))
    assert torch.equal(_one(img, 0.0, 0.0, 0.0, flip=False), img)
    flipped_then_moved = _one(img, 0.0, 3.0, -2.0, flip=True)
    assert torch.equal(flipped_then_moved, _tv_affine(torch.flip(img, dims=[-1]), 0.0, 3, -2))


def test_batch_core_uses_each_images_parameters() -> None:
    imgs = torch.randn(3, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    angle, tx, ty = torch.tensor([0.0, 5.0, -8.0]), torch.tensor([1.0, -3.0, 0.0]), torch.zeros(3)
    flip = torch.tensor([False, True, False])
    out = affine_batch(imgs, angle, tx, ty, flip)
    for i in range(3):
        assert torch.equal(
            out[i], _one(imgs[i], angle[i].item(), tx[i].item(), ty[i].item(), bool(flip[i]))
        )


# ---------------------------------------------------------------------------------------------
# (2) statistical agreement with the study's torchvision pipeline, and the test's power
# ---------------------------------------------------------------------------------------------

N_STAT = 1500
BG = 51  # background grey == mean, so the normalized background (and torchvision's fill) is 0
STAT_MEAN, STAT_STD = BG / 255, 0.25


def _bar_image() -> torch.Tensor:
    """A bright 20x4 bar centred at (23.5, 23.5): its centroid measures the shift and its
    principal axis the rotation, independently of each other."""
    img = torch.full((48, 48), BG, dtype=torch.uint8)
    img[22:26, 14:34] = 255
    return img


def _bar_stats(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: centroid shift (dx, dy) in pixels and the bar's angle in degrees (CCW)."""
    m = (out[:, 0] > 1.0).float()
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    w = m.sum((1, 2))
    cx = (m * xs).sum((1, 2)) / w
    cy = (m * ys).sum((1, 2)) / w
    ddx, ddy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    mu20, mu02 = (m * ddx * ddx).sum((1, 2)), (m * ddy * ddy).sum((1, 2))
    mu11 = (m * ddx * ddy).sum((1, 2))
    angle = -0.5 * torch.rad2deg(torch.atan2(2 * mu11, mu20 - mu02))  # y points down
    return {"dx": cx - 23.5, "dy": cy - 23.5, "angle": angle, "mean_img": out.mean(0)}


@pytest.fixture(scope="module")
def torchvision_stats() -> dict[str, torch.Tensor]:
    """The study's pipeline, one image at a time, as a DataLoader would run it."""
    torch.manual_seed(123)
    tv = v2.Compose(
        [
            v2.Normalize([STAT_MEAN], [STAT_STD]),
            v2.RandomRotation(10),
            v2.RandomAffine(degrees=0, translate=(0.1, 0.1)),
        ]
    )
    x = _bar_image().float().div(255).unsqueeze(0)
    return _bar_stats(torch.stack([tv(x) for _ in range(N_STAT)]))


def _mismatches(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """What differs beyond sampling noise (std ratios within 10 %: ~3 % noise at N=1500)."""
    bad = []
    for key in ("dx", "dy", "angle"):
        ratio = (ours[key].std() / ref[key].std()).item()
        if not 0.9 < ratio < 1.1:
            bad.append(f"std({key}) ratio {ratio:.3f}")
        limit = 0.1 * ref[key].std().item()
        if abs(ours[key].mean().item() - ref[key].mean().item()) > limit:
            bad.append(f"mean({key}) {ours[key].mean().item():.3f}")
    rel = ((ours["mean_img"] - ref["mean_img"]).norm() / ref["mean_img"].norm()).item()
    if rel > 0.15:
        bad.append(f"mean image differs by {rel:.3f}")
    return bad


def _stat_batch() -> torch.Tensor:
    return _bar_image().expand(N_STAT, 48, 48).contiguous()


@pytest.mark.slow  # statistics over thousands of torchvision draws
def test_distribution_matches_torchvision(torchvision_stats: dict[str, torch.Tensor]) -> None:
    assert torchvision_stats["dx"].std() > 2.5 and torchvision_stats["angle"].std() > 5.0
    torch.manual_seed(7)
    transform = make_transform(
        TransformsConfig(rotation=10, translate=0.1, hflip=False), STAT_MEAN, STAT_STD
    )
    assert _mismatches(_bar_stats(transform(_stat_batch())), torchvision_stats) == []


def _broken(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plausible wrong implementations that the statistical test must catch."""
    norm = BatchTransform(STAT_MEAN, STAT_STD)

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = norm(x)
        u = torch.rand(out.shape[0], 3)
        angle = 20 * u[:, 0] - 10
        tx, ty = (torch.round((2 * u[:, i] - 1) * 4.8) for i in (1, 2))
        if kind == "no_translation":
            tx, ty = torch.zeros_like(tx), torch.zeros_like(ty)
        elif kind == "no_rotation":
            angle = torch.zeros_like(angle)
        elif kind == "one_draw_per_batch":
            angle, tx, ty = (v[:1].expand_as(v) for v in (angle, tx, ty))
        elif kind == "rotation_20":
            angle = 2 * angle
        elif kind == "rotation_15":
            angle = 1.5 * angle
        elif kind == "translate_normalized_units":  # 0.1 of the [-1, 1] span = 2.4 px
            tx, ty = torch.round(tx / 2), torch.round(ty / 2)
        elif kind == "translate_doubled":
            tx, ty = 2 * tx, 2 * ty
        return affine_batch(out, angle, tx, ty)

    return apply


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "no_translation",
        "no_rotation",
        "one_draw_per_batch",
        "rotation_20",
        "rotation_15",
        "translate_normalized_units",
        "translate_doubled",
    ],
)
def test_statistical_check_catches_broken_variants(
    kind: str, torchvision_stats: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(7)
    assert _mismatches(_bar_stats(_broken(kind)(_stat_batch())), torchvision_stats) != []


@pytest.mark.slow  # statistics over thousands of torchvision draws
def test_hflip_with_geometry_matches_torchvision() -> None:
    """With flips, a bar left of centre lands left or right at random, like RandomHorizontalFlip."""
    img = torch.full((48, 48), BG, dtype=torch.uint8)
    img[22:26, 6:20] = 255
    n = 600
    torch.manual_seed(11)
    tv = v2.Compose(
        [
            v2.Normalize([STAT_MEAN], [STAT_STD]),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.RandomAffine(degrees=0, translate=(0.1, 0.1)),
        ]
    )
    x = img.float().div(255).unsqueeze(0)
    ref = _bar_stats(torch.stack([tv(x) for _ in range(n)]))
    transform = BatchTransform(STAT_MEAN, STAT_STD, rotation=10, translate=0.1, hflip=True)
    ours = _bar_stats(transform(img.expand(n, 48, 48)))
    for stats in (ours, ref):
        right = (stats["dx"] > 0).float().mean()
        assert 0.42 < right < 0.58
    assert 0.9 < (ours["dx"].std() / ref["dx"].std()).item() < 1.1
    assert 0.9 < (ours["dy"].std() / ref["dy"].std()).item() < 1.1


def test_hflip_only_is_exact_flip_half_the_time() -> None:
    x = torch.randint(
        0, 256, (400, 48, 48), generator=torch.Generator().manual_seed(4), dtype=torch.uint8
    )
    transform = BatchTransform(MEAN, STD, hflip=True)
    torch.manual_seed(0)
    out = transform(x)
    plain = transform(x, train=False)
    same = (out == plain).flatten(1).all(1)
    flipped = (out == plain.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())
    assert 0.4 < flipped.float().mean().item() < 0.6


# ---------------------------------------------------------------------------------------------
# (3) independence, (4) eval / determinism, (5) dtype, shape, device, values
# ---------------------------------------------------------------------------------------------


def test_each_image_gets_its_own_parameters() -> None:
    img = torch.randint(
        0, 256, (48, 48), generator=torch.Generator().manual_seed(5), dtype=torch.uint8
    )
    torch.manual_seed(0)
    out = make_transform(TransformsConfig(rotation=10, translate=0.1), MEAN, STD)(
        img.expand(64, 48, 48)
    )
    assert len({tuple(o.flatten().tolist()) for o in out}) >= 60


def test_seeded_and_eval_behaviour() -> None:
    x = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    transform = make_transform(
        TransformsConfig(name="aug", rotation=10.0, translate=0.1, hflip=True), MEAN, STD
    )
    assert transform.is_random
    torch.manual_seed(3)
    a = transform(x)
    torch.manual_seed(3)
    assert torch.equal(a, transform(x))
    assert not torch.equal(a, transform(x))  # the RNG moved on
    plain = transform.normalize(x)
    assert torch.equal(transform(x, train=False), plain)
    norm = make_transform(
        TransformsConfig(name="norm", rotation=0.0, translate=0.0, hflip=False), MEAN, STD
    )
    assert not norm.is_random
    assert not make_transform(None, MEAN, STD).is_random
    state = torch.get_rng_state()
    assert torch.equal(norm(x), plain) and torch.equal(norm(x, train=False), plain)
    assert torch.equal(torch.get_rng_state(), state)  # normalization draws no random numbers


def test_output_dtype_shape_and_values_match_totensor_normalize() -> None:
    x = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    transform = make_transform(TransformsConfig(rotation=10, translate=0.1), MEAN, STD)
    study = T.Compose([T.ToTensor(), T.Normalize([MEAN], [STD])])
    ref = torch.stack([study(img.numpy()) for img in x])
    for inp in (x, x.unsqueeze(1)):
        for train in (True, False):
            out = transform(inp, train=train)
            assert out.shape == (5, 1, 48, 48) and out.dtype == torch.float32
            assert out.device == x.device and out.is_contiguous()
        torch.testing.assert_close(transform(inp, train=False), ref, rtol=0, atol=1e-6)
    assert transform(
        torch.full((1, 48, 48), 255, dtype=torch.uint8), train=False
    ).max().item() == pytest.approx((1 - MEAN) / STD)


def test_invalid_input_and_config() -> None:
    transform = BatchTransform(MEAN, STD)
    with pytest.raises(TypeError, match="uint8"):
        transform(torch.zeros(2, 48, 48))
    with pytest.raises(ValueError, match="shape"):
        transform(torch.zeros(2, 3, 48, 48, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="transforms.translate"):  # the schema, up front
        TransformsConfig(translate=1.5)
    with pytest.raises(ConfigError, match="transforms.rotation"):
        TransformsConfig(rotation=-1)
    with pytest.raises(ValueError, match="std"):
        BatchTransform(MEAN, 0.0)
    pair = BatchTransform(MEAN, STD, rotation=[-5, 5], translate=[0.1, 0.0])
    assert pair.rotation == (-5.0, 5.0) and pair.translate == (0.1, 0.0)
    with pytest.raises(ValueError, match="reversed"):
        BatchTransform(MEAN, STD, rotation=[5, -5])
    typed = make_transform(TransformsConfig(name="aug", rotation=10.0, translate=0.1), MEAN, STD)
    assert typed.rotation == (-10.0, 10.0) and typed.translate == (0.1, 0.1) and not typed.hflip


def test_warps_drawn_for_an_epoch_then_sliced_equal_one_call() -> None:
    """train_epoch draws every image's warp once and slices a batch's: the same images and
    matrices give the same output whichever way they are grouped."""
    x = torch.randint(
        0, 256, (10, 48, 48), generator=torch.Generator().manual_seed(6), dtype=torch.uint8
    )
    transform = make_transform(TransformsConfig(rotation=10, translate=0.1, hflip=True), MEAN, STD)
    torch.manual_seed(0)
    warps = transform.draw(10, (48, 48), "cpu")
    assert warps.shape == (10, 2, 3)
    whole = transform(x, warps=warps)
    parts = torch.cat([transform(x[i : i + 4], warps=warps[i : i + 4]) for i in range(0, 10, 4)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, transform(x, train=False))
    assert torch.equal(transform(x, train=False, warps=warps), transform(x, train=False))
    torch.manual_seed(0)
    assert torch.equal(transform(x), whole)  # a call without warps draws the same ones
    with pytest.raises(ValueError, match="3 warps for 10 images"):
        transform(x, warps=warps[:3])
    flips = BatchTransform(MEAN, STD, hflip=True).draw(10, (48, 48), "cpu")
    assert flips.dtype == torch.bool and flips.shape == (10,)
    with pytest.raises(ValueError, match="only normalizes"):
        BatchTransform(MEAN, STD).draw(10, (48, 48), "cpu")


def test_no_host_sync_in_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA a .item()/.cpu() would stall the pipeline every batch; forbid them outright."""
    transform = make_transform(TransformsConfig(rotation=10, translate=0.1, hflip=True), MEAN, STD)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync in BatchTransform.__call__")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    transform(torch.zeros(4, 48, 48, dtype=torch.uint8))
    BatchTransform(MEAN, STD, hflip=True)(torch.zeros(4, 48, 48, dtype=torch.uint8))


@pytest.mark.may_skip
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_and_stays_on_device() -> None:
    transform = make_transform(TransformsConfig(rotation=10, translate=0.1, hflip=True), MEAN, STD)
    x = torch.randint(0, 256, (100, 48, 48), dtype=torch.uint8, device="cuda")
    transform(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = transform(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == x.device and out.shape == (100, 1, 48, 48)
