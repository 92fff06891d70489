"""Model builders against the study: Table 2's rows build, §5.1.2's ResNet is reproduced exactly."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fer_sweep.core.config import ModelConfig, validate
from fer_sweep.core.models import (
    build_model,
    conv_net,
    count_parameters,
    describe,
    resnet,
    summary,
    summary_text,
)
from fer_sweep.errors import ConfigError

_CNN2 = {
    "builder": "cnn",
    "conv_channels": [10, 20],
    "kernel_size": 3,
    "padding": 0,
    "pool": 2,
    "batchnorm": False,
    "hidden": [300, 150],
    "dropout": 0.0,
}
_RESNET = {
    "builder": "resnet",
    "stem_channels": 64,
    "stages": [
        {"channels": 64, "blocks": 2, "stride": 1},
        {"channels": 128, "blocks": 2, "stride": 2},
    ],
    "pool_size": 6,
    "hidden": [500],
    "dropout": 0.0,
}

# Table 2's seven rows as the YAML configures them.
TABLE2 = {
    "cnn2": {**_CNN2, "name": "cnn2"},
    "cnn2_fc1000": {**_CNN2, "name": "cnn2_fc1000", "hidden": [1000, 250]},
    "cnn2_fc3": {**_CNN2, "name": "cnn2_fc3", "hidden": [1000, 250, 100]},
    "cnn3": {**_CNN2, "name": "cnn3", "conv_channels": [10, 20, 40]},
    "resnet_small": {
        **_RESNET,
        "name": "resnet_small",
        "stages": [
            {"channels": 64, "blocks": 1, "stride": 1},
            {"channels": 128, "blocks": 1, "stride": 2},
        ],
    },
    "resnet": {**_RESNET, "name": "resnet"},
    "resnet_dropout": {**_RESNET, "name": "resnet_dropout", "dropout": 0.5},
}


def _model(cfg: dict) -> ModelConfig:
    """A model config through the schema, as Hydra's composed config reaches the builders."""
    return validate(OmegaConf.create({"model": cfg})).model


# §5.1.2 of the study, verbatim: this table IS the spec for the `resnet` configuration.
STUDY_TABLE = [
    ("Conv2d-1", [-1, 64, 48, 48], 576),
    ("BatchNorm2d-2", [-1, 64, 48, 48], 128),
    ("Conv2d-3", [-1, 64, 48, 48], 36_864),
    ("BatchNorm2d-4", [-1, 64, 48, 48], 128),
    ("Conv2d-5", [-1, 64, 48, 48], 36_864),
    ("BatchNorm2d-6", [-1, 64, 48, 48], 128),
    ("ResBlock-7", [-1, 64, 48, 48], 0),
    ("Conv2d-8", [-1, 64, 48, 48], 36_864),
    ("BatchNorm2d-9", [-1, 64, 48, 48], 128),
    ("Conv2d-10", [-1, 64, 48, 48], 36_864),
    ("BatchNorm2d-11", [-1, 64, 48, 48], 128),
    ("ResBlock-12", [-1, 64, 48, 48], 0),
    ("Conv2d-13", [-1, 128, 24, 24], 73_728),
    ("BatchNorm2d-14", [-1, 128, 24, 24], 256),
    ("Conv2d-15", [-1, 128, 24, 24], 147_456),
    ("BatchNorm2d-16", [-1, 128, 24, 24], 256),
    ("Conv2d-17", [-1, 128, 24, 24], 8_192),
    ("BatchNorm2d-18", [-1, 128, 24, 24], 256),
    ("ResBlock-19", [-1, 128, 24, 24], 0),
    ("Conv2d-20", [-1, 128, 24, 24], 147_456),
    ("BatchNorm2d-21", [-1, 128, 24, 24], 256),
    ("Conv2d-22", [-1, 128, 24, 24], 147_456),
    ("BatchNorm2d-23", [-1, 128, 24, 24], 256),
    ("ResBlock-24", [-1, 128, 24, 24], 0),
    ("Linear-25", [-1, 500], 2_304_500),
    ("Linear-26", [-1, 7], 3_507),
]
STUDY_TOTAL = 2_982_247


@pytest.fixture(scope="module")
def study_resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(_model(TABLE2["resnet"]))


@pytest.mark.parametrize("name", list(TABLE2))
def test_table2_rows_build_and_map_to_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_model(TABLE2[name]))
    out = model(torch.randn(4, 1, 48, 48))
    assert out.shape == (4, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_study_resnet_parameter_count(study_resnet: nn.Module) -> None:
    assert count_parameters(study_resnet) == STUDY_TOTAL
    assert count_parameters(resnet(64, _RESNET["stages"], pool_size=6, hidden=[500])) == STUDY_TOTAL


def test_study_resnet_summary_matches_section_5_1_2(study_resnet: nn.Module) -> None:
    assert summary(study_resnet) == STUDY_TABLE
    assert sum(p for _, _, p in STUDY_TABLE) == STUDY_TOTAL  # the table is self-consistent


def test_summary_text_like_the_study(study_resnet: nn.Module) -> None:
    text = summary_text(study_resnet)
    lines = text.splitlines()
    header = ["Layer", "(type)", "Output", "Shape", "Param", "#"]
    assert any(line.split() == header for line in lines)
    assert any(line.split() == ["Linear-25", "[-1,", "500]", "2,304,500"] for line in lines)
    for expected in (
        "Total params: 2,982,247",
        "Trainable params: 2,982,247",
        "Non-trainable params: 0",
        "Input size (MB): 0.01",
        "Forward/backward pass size (MB): 20.25",
        "Params size (MB): 11.38",
        "Estimated Total Size (MB): 31.64",
    ):
        assert expected in lines


def test_summary_leaves_model_state_alone(study_resnet: nn.Module) -> None:
    study_resnet.train()
    bn = study_resnet.stem_bn
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    summary(study_resnet)
    assert study_resnet.training
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])
    assert not study_resnet._forward_hooks and not bn._forward_hooks


def test_describe_in_table2_style(study_resnet: nn.Module) -> None:
    assert describe(build_model(_model(TABLE2["cnn2"]))) == (
        "Conv2d-10-3x3, MaxPool2d-2x2, Conv2d-20-3x3, MaxPool2d-2x2, "
        "Linear-2000-300, Linear-300-150, Linear-150-7"
    )
    assert describe(study_resnet) == (
        "Conv2d-64-3x3, BatchNorm2d-64, ResBlock-64 (x2), ResBlock-128 (x2), "
        "Linear-4608-500, Linear-500-7"
    )
    assert describe(build_model(_model(TABLE2["resnet_dropout"]))).endswith(
        "Linear-4608-500, Dropout-0.5, Linear-500-7"
    )
    assert "ResBlock-64, ResBlock-128, Linear-4608-500" in describe(
        build_model(_model(TABLE2["resnet_small"]))
    )


def test_flatten_size_is_computed_from_image_size() -> None:
    # The study's Linear-720-300 is what a 32x32 input gives (20 * 6 * 6).
    assert "Linear-720-300" in describe(conv_net([10, 20], hidden=[300, 150], image_size=32))
    assert "Linear-640-300" in describe(build_model(_model(TABLE2["cnn3"])))  # 40 * 4 * 4 at 48x48
    small = build_model(_model(TABLE2["cnn2"]), image_size=32)
    assert small(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    padded = conv_net([8, 8], padding=1, hidden=[], image_size=48)  # 48->24->12: 8*12*12
    assert describe(padded).endswith("Linear-1152-7")


def test_conv_net_options() -> None:
    model = conv_net([8, 16], batchnorm=True, hidden=[32, 16], dropout=0.25, num_classes=5)
    assert describe(model) == (
        "Conv2d-8-3x3, BatchNorm2d-8, MaxPool2d-2x2, Conv2d-16-3x3, BatchNorm2d-16, "
        "MaxPool2d-2x2, Linear-1600-32, Dropout-0.25, Linear-32-16, Dropout-0.25, Linear-16-5"
    )
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    names = [name.rsplit("-", 1)[0] for name, _, _ in summary(model)]
    assert "ReLU" not in names and "Flatten" not in names  # activations are functional
    assert model(torch.randn(3, 1, 48, 48)).shape == (3, 5)


@pytest.mark.parametrize("name", ["cnn2", "cnn3", "resnet_dropout"])
def test_channels_last_and_bf16_autocast(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(_model(TABLE2[name])).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 48, 48).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x.contiguous())
        cl = model(x)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_build_model_config_handling() -> None:
    assert build_model(_model(TABLE2["cnn2"]), num_classes=3)(torch.randn(1, 1, 48, 48)).shape == (
        1,
        3,
    )
    # Settings are checked once, by the schema, before any builder runs ...
    with pytest.raises(ConfigError, match="builder"):
        _model({"builder": "vgg"})
    with pytest.raises(ConfigError, match="did you mean model.hidden"):
        _model({**_CNN2, "hiden": [10]})
    with pytest.raises(ConfigError, match="conv_channels"):
        _model({"builder": "cnn", "conv_channels": []})
    with pytest.raises(ConfigError, match="dropout"):
        _model({**_RESNET, "dropout": 1.5})
    with pytest.raises(ConfigError, match="stages"):
        _model({**_RESNET, "stages": [{"channels": 64}]})
    # ... the builder only checks what needs the image size.
    with pytest.raises(ConfigError, match="shrink"):
        conv_net([4, 4, 4, 4, 4, 4])
