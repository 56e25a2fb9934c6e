"""Tests of the segmentation models, the registry and the size/cost helpers (CPU, tiny widths)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.models import (
    FCN,
    MODELS,
    UNet,
    UNetConfig,
    build_model,
    count_parameters,
    flops_per_sample,
)
from r2d2_hpc.models.blocks import bilinear_kernel

TINY_UNET = {"base_width": 4, "max_width": 16}
TINY_FCN = {"base_width": 2, "max_width": 8, "fc_width": 8}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("spatial", "options"),
    [
        ((32, 48), {"depth": 4}),
        ((8, 16, 24), {"depth": 3}),
        ((16, 8), {"depth": 3, "downsample": "strided_conv"}),
    ],
)
def test_unet_logits_have_input_size(spatial: tuple[int, ...], options: dict) -> None:
    model = build_model("unet", 2, 3, len(spatial), **TINY_UNET, **options).eval()
    logits = model(torch.randn(2, 2, *spatial))
    assert logits.shape == (2, 3, *spatial)
    assert model.required_multiple == 2 ** options["depth"]


@pytest.mark.parametrize("variant", ["32s", "16s", "8s"])
@pytest.mark.parametrize(("spatial", "stages"), [((64, 32), [2, 2, 3, 3, 3]), ((8, 16, 24), [1, 1, 1])])
def test_fcn_logits_have_input_size(variant: str, spatial: tuple[int, ...], stages: list[int]) -> None:
    model = build_model("fcn", 1, 4, len(spatial), variant=variant, convs_per_stage=stages, **TINY_FCN).eval()
    logits = model(torch.randn(1, 1, *spatial))
    assert logits.shape == (1, 4, *spatial)
    assert model.required_multiple == 2 ** len(stages)


def test_size_not_divisible_names_size_and_multiple() -> None:
    model = build_model("unet", 1, 2, 2, depth=4, **TINY_UNET)
    with pytest.raises(ConfigError, match=r"\(40, 32\).*multiple of 16.*pad or crop") as info:
        model(torch.zeros(1, 1, 40, 32))
    assert "[32, 32] (crop) or [48, 32] (pad)" in str(info.value)
    fcn = build_model("fcn", 1, 2, 3, convs_per_stage=[1, 1, 1], **TINY_FCN)
    with pytest.raises(ConfigError, match=r"\(8, 8, 12\).*multiple of 8"):
        fcn(torch.zeros(1, 1, 8, 8, 12))


def test_wrong_channels_or_dims_raise() -> None:
    model = build_model("unet", 2, 2, 2, depth=1, **TINY_UNET)
    with pytest.raises(ConfigError, match=r"\(1, 3, 8, 8\).*2 channels"):
        model(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="2 spatial sizes"):
        model(torch.zeros(1, 2, 8, 8, 8))


def test_deep_supervision_list_in_train_tensor_in_eval() -> None:
    model = build_model("unet", 1, 3, 2, depth=3, deep_supervision=True, **TINY_UNET)
    outputs = model.train()(torch.randn(2, 1, 32, 16))
    assert isinstance(outputs, list)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 16), (2, 3, 16, 8), (2, 3, 8, 4)]
    logits = model.eval()(torch.randn(2, 1, 32, 16))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3, 32, 16)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("unet", {"depth": 2, "deep_supervision": True, "dropout_p": 0.2, **TINY_UNET}),
        ("fcn", {"variant": "8s", "convs_per_stage": [1, 1, 2], **TINY_FCN}),
    ],
)
def test_gradients_reach_every_parameter(name: str, options: dict) -> None:
    model = build_model(name, 2, 3, 2, **options).train()
    outputs = model(torch.randn(2, 2, 16, 24))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    loss = sum(F.cross_entropy(o, torch.randint(0, 3, (2, *o.shape[2:]))) for o in outputs)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    zero_grad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert no_grad == [] and zero_grad == []


def test_parameter_count_matches_hand_computation() -> None:
    # U-Net depth 1, width 4, no norm (so every conv has a bias), 1 channel in, 2 classes, 2D, 3x3 kernels.
    enc0 = (1 * 4 * 9 + 4) + (4 * 4 * 9 + 4)
    bottleneck = (4 * 8 * 9 + 8) + (8 * 8 * 9 + 8)
    up = 8 * 4 * 2 * 2 + 4
    dec0 = (8 * 4 * 9 + 4) + (4 * 4 * 9 + 4)
    head = 4 * 2 + 2
    unet = build_model("unet", 1, 2, 2, depth=1, base_width=4, norm="none")
    assert count_parameters(unet) == enc0 + bottleneck + up + dec0 + head == 1650
    # FCN-32s, one stage of one conv (width 2), fc 3 wide with 1x1 kernel; upscore 2x: 2x2x4x4 without bias.
    fcn = build_model(
        "fcn",
        1,
        2,
        2,
        variant="32s",
        convs_per_stage=[1],
        base_width=2,
        fc_width=3,
        fc_kernel_size=1,
        norm="none",
    )
    assert count_parameters(fcn) == (9 * 2 + 2) + (2 * 3 + 3) + (3 * 3 + 3) + (3 * 2 + 2) + 2 * 2 * 16 == 113
    fcn.upscore.weight.requires_grad_(False)
    assert count_parameters(fcn, trainable_only=True) == 113 - 64


def test_flops_of_single_layers_match_formula() -> None:
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert flops_per_sample(conv, (3, 8, 6)) == 2 * (5 * 8 * 6) * (3 * 3 * 3)
    conv3d = nn.Conv3d(2, 4, kernel_size=(3, 1, 1), stride=2, padding=(1, 0, 0), groups=2)
    assert flops_per_sample(conv3d, (2, 8, 8, 8)) == 2 * (4 * 4 * 4 * 4) * (1 * 3)
    up = nn.ConvTranspose2d(4, 2, kernel_size=2, stride=2).train()
    assert flops_per_sample(up, (4, 3, 5)) == 2 * (4 * 3 * 5) * (2 * 2 * 2)
    assert up.training  # the mode is restored
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    assert flops_per_sample(linear, (3, 4)) == 2 * 12 * 7


def test_weights_round_trip(tmp_path) -> None:
    options = {"depth": 2, "norm": "batch", **TINY_UNET}
    model = build_model("unet", 1, 2, 2, **options)
    model(torch.randn(4, 1, 16, 16))  # updates the batch-norm running statistics, which must be saved too
    path = tmp_path / "unet.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 1, 16, 16)
    expected = model.eval()(x)
    loaded = build_model("unet", 1, 2, 2, weights_path=str(path), **options).eval()
    assert torch.equal(loaded(x), expected)
    # A checkpoint of a DDP-wrapped model ({"model": {"module.<name>": ...}}) loads too.
    ddp_path = tmp_path / "last.pt"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": 3}, ddp_path)
    assert torch.equal(
        build_model("unet", 1, 2, 2, weights_path=str(ddp_path), **options).eval()(x), expected
    )


def test_mismatched_weights_name_the_file(tmp_path) -> None:
    path = tmp_path / "fcn8s.pt"
    torch.save(build_model("fcn", 1, 3, 2, variant="8s", **TINY_FCN).state_dict(), path)
    with pytest.raises(
        ConfigError,
        match=r"fcn8s\.pt.*unexpected \(6\): score_pool3\.bias.*upscore\.weight \(3, 3, 16, 16\) vs \(3, 3, 64, 64\)",
    ):
        build_model("fcn", 1, 3, 2, variant="32s", **TINY_FCN, weights_path=str(path))
    with pytest.raises(
        ConfigError, match=r"fcn8s\.pt.*shape mismatch.*score_fr\.weight \(3, 8, 1, 1\) vs \(2, 8"
    ):
        build_model("fcn", 1, 2, 2, variant="8s", **TINY_FCN, weights_path=str(path))
    with pytest.raises(ConfigError, match=r"missing\.pt: weights file not found"):
        build_model("fcn", 1, 3, 2, **TINY_FCN, weights_path=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk\.pt: cannot be read by torch\.load"):
        build_model("fcn", 1, 3, 2, **TINY_FCN, weights_path=str(tmp_path / "junk.pt"))


@pytest.mark.parametrize(
    ("norm", "norm_type"),
    [("batch", nn.BatchNorm3d), ("instance", nn.InstanceNorm3d), ("group", nn.GroupNorm), ("none", None)],
)
def test_each_norm_builds_and_runs(norm: str, norm_type: type | None) -> None:
    model = build_model("unet", 1, 2, 3, depth=2, norm=norm, base_width=4, max_width=32).train()
    logits = model(torch.randn(2, 1, 8, 8, 8))
    assert logits.shape == (2, 2, 8, 8, 8) and torch.isfinite(logits).all()
    norm_types = {
        type(m) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
    }
    assert norm_types == (set() if norm_type is None else {norm_type})
    if norm == "group":  # 8 groups, or fewer when the width is smaller
        assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)][:4] == [4, 4, 8, 8]
    convs_with_bias = [m.bias is not None for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert convs_with_bias[:4] == [norm == "none"] * 4


def test_unet_widths_double_and_cap() -> None:
    model = UNet(1, 2, 2, UNetConfig(depth=4, base_width=4, max_width=16))
    assert [enc[1][0].out_channels for enc in model.encoders] == [4, 8, 16, 16, 16]
    strided = UNet(1, 2, 2, UNetConfig(depth=2, base_width=4, downsample="strided_conv"))
    assert not any(isinstance(m, nn.MaxPool2d) for m in strided.modules())
    assert [enc[0][0].stride for enc in strided.encoders] == [(1, 1), (2, 2), (2, 2)]


def test_fcn_variants_differ_in_skip_layers() -> None:
    layers = {}
    for variant in ("32s", "16s", "8s"):
        model = build_model("fcn", 1, 2, 2, variant=variant, **TINY_FCN)
        layers[variant] = {n.split(".")[0] for n, _ in model.named_parameters()} - {"stages", "fc6", "fc7"}
        assert isinstance(model, FCN)
        assert model.upscore.stride == {"32s": (32, 32), "16s": (16, 16), "8s": (8, 8)}[variant]
    assert layers["32s"] == {"score_fr", "upscore"}
    assert layers["16s"] == layers["32s"] | {"upscore2", "score_pool4"}
    assert layers["8s"] == layers["16s"] | {"upscore_pool4", "score_pool3"}


def test_upsampling_starts_bilinear() -> None:
    # The learned 8x upsampling starts equal to bilinear interpolation (align_corners=False) away from borders.
    model = build_model("fcn", 1, 2, 2, variant="32s", convs_per_stage=[1, 1, 1], **TINY_FCN)
    ramp = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 2, 6, 6).contiguous()
    upsampled = model.upscore(ramp)
    reference = F.interpolate(ramp, scale_factor=8, mode="bilinear", align_corners=False)
    assert upsampled.shape == (1, 2, 48, 48)
    torch.testing.assert_close(upsampled[..., 8:-8, 8:-8], reference[..., 8:-8, 8:-8])
    assert bilinear_kernel(1, 4, 2)[0, 0, :, 0].tolist() == [0.0625, 0.1875, 0.1875, 0.0625]


def test_registry_rejects_unknown_names_options_and_values() -> None:
    assert sorted(MODELS) == ["fcn", "unet"]
    with pytest.raises(ConfigError, match=r"Unknown model 'vnet'\. Valid models are: fcn, unet"):
        build_model("vnet", 1, 2, 2)
    with pytest.raises(
        ConfigError, match=r"Unavailable option\(s\) for model 'unet': widht\. Valid options.*base_width"
    ):
        build_model("unet", 1, 2, 2, widht=8)
    with pytest.raises(ConfigError, match=r"model\.norm='layer'.*batch, instance, group, none"):
        build_model("unet", 1, 2, 2, norm="layer")
    with pytest.raises(ConfigError, match=r"variant=8s.*needs more than"):
        build_model("fcn", 1, 2, 2, variant="8s", convs_per_stage=[2, 2])
    with pytest.raises(ConfigError, match="spatial_dims=1"):
        build_model("fcn", 1, 2, 1)


def test_flops_are_counted_on_the_meta_device_and_match_a_real_forward() -> None:
    """No real convolution runs to count FLOPs (a 3D U-Net's CPU forward costs a TFLOP and a minute)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    devices: list[str] = []

    class RecordConvolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                devices.append(args[0].device.type)
            return func(*args, **(kwargs or {}))

    model = build_model("unet", 2, 3, 3, depth=2, base_width=4, norm="batch").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with RecordConvolutions():
        flops = flops_per_sample(model, (2, 16, 16, 8))
    assert devices and set(devices) == {"meta"}
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same count from a real forward pass with hooks on the real layers
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.ConvTranspose3d):
            macs += inputs[0][0].numel() * module.out_channels * math.prod(module.kernel_size)
        elif isinstance(module, nn.Conv3d):
            macs += output[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 2, 16, 16, 8))
    for handle in handles:
        handle.remove()
    assert flops == 2 * macs > 0
