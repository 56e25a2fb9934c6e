"""Fully convolutional network (Long, Shelhamer & Darrell, CVPR 2015): FCN-32s, FCN-16s and FCN-8s, 2D or 3D.

The encoder is VGG-style (stages of 3x3 convs, each stage followed by a 2x max-pool), trained from scratch.
Differences from the paper, on purpose: 'same' padding everywhere instead of the first conv's pad=100 and the
crop layers, so any input whose size ``2**num_stages`` divides gives logits at input resolution; an optional
normalisation after each encoder conv (the paper started from ImageNet weights, we do not); He init; and fc6 is
narrower by default (``fc_width``/``fc_kernel_size``; 4096/7 gives the paper's fc6/fc7 in 2D).
Layer names follow the paper's net (``score_fr``, ``upscore2``, ``score_pool4``, ...): "pool4" is the output of
the second-to-last stage and "pool3" that of the third-to-last, whatever the number of stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.models import blocks

VARIANTS = ("32s", "16s", "8s")
# Number of skip fusions (pool4, then pool3) per variant.
_NUM_SKIPS = {"32s": 0, "16s": 1, "8s": 2}


@dataclass
class FCNConfig:
    """Options of the FCN (``model.name=fcn``)."""

    variant: str = "8s"  # 32s (no skips) | 16s (fuses pool4) | 8s (fuses pool4 and pool3)
    convs_per_stage: list[int] = field(default_factory=lambda: [2, 2, 3, 3, 3])  # 3x3 convs per stage (VGG16)
    base_width: int = 64  # channels of the first stage; doubled at each stage
    max_width: int = 512  # cap on the channels of any stage (VGG16: 64, 128, 256, 512, 512)
    norm: str = "instance"  # batch | instance | group | none (paper: none, with pretrained weights)
    activation: str = "relu"  # relu (paper) | leaky_relu
    fc_width: int = 1024  # channels of the conv "fc6" and "fc7" layers (paper: 4096)
    fc_kernel_size: int = 3  # odd kernel size of fc6 (paper: 7 in 2D; 7**3 in 3D is impractically large)
    fc_dropout_p: float = 0.5  # dropout probability after fc6 and after fc7 (paper: 0.5)
    weights_path: str | None = None  # local state dict to load after building (strict); None: random init

    def __post_init__(self) -> None:
        blocks.check_choice("model.variant", self.variant, VARIANTS)
        # Hydra hands lists over as ListConfig; a plain list keeps the config picklable and comparable.
        self.convs_per_stage = [int(n) for n in self.convs_per_stage]
        num_stages = len(self.convs_per_stage)
        if not 1 <= num_stages <= 7 or any(n < 1 for n in self.convs_per_stage):
            raise ConfigError(
                f"model.convs_per_stage={self.convs_per_stage} must list 1 to 7 stages of at least 1 conv each"
            )
        if num_stages <= _NUM_SKIPS[self.variant]:
            raise ConfigError(
                f"model.variant={self.variant} fuses {_NUM_SKIPS[self.variant]} earlier stage(s) and needs more than "
                f"that many stages; got {num_stages}. Fix: add stages to model.convs_per_stage or use variant=32s"
            )
        if self.base_width < 1 or self.max_width < self.base_width or self.fc_width < 1:
            raise ConfigError(
                f"model.base_width={self.base_width} and model.fc_width={self.fc_width} must be >= 1 and "
                f"model.max_width={self.max_width} >= base_width"
            )
        if self.fc_kernel_size < 1 or self.fc_kernel_size % 2 == 0:
            raise ConfigError(f"model.fc_kernel_size={self.fc_kernel_size} must be odd ('same' padding)")
        blocks.check_choice("model.norm", self.norm, blocks.NORMS)
        blocks.check_choice("model.activation", self.activation, blocks.ACTIVATIONS)
        if not 0.0 <= self.fc_dropout_p < 1.0:
            raise ConfigError(f"model.fc_dropout_p={self.fc_dropout_p} must be in [0, 1)")

    @property
    def num_stages(self) -> int:
        """Number of encoder stages (each ends with a 2x max-pool)."""
        return len(self.convs_per_stage)

    def width(self, stage: int) -> int:
        """Channels of encoder stage ``stage`` (0-based)."""
        return min(self.base_width * 2**stage, self.max_width)


def _upsample(dims: int, num_classes: int, factor: int) -> nn.Module:
    """A learned transposed conv that scales by ``factor`` exactly (kernel 2*factor, padding factor/2),
    initialised to bilinear interpolation of each class map, without bias (as in the paper's net)."""
    layer = blocks.conv_transpose(
        dims, num_classes, num_classes, kernel_size=2 * factor, stride=factor, padding=factor // 2, bias=False
    )
    with torch.no_grad():
        layer.weight.copy_(blocks.bilinear_kernel(num_classes, 2 * factor, dims))
    return layer


def _score(dims: int, in_channels: int, num_classes: int, zero: bool) -> nn.Module:
    layer = blocks.conv(dims, in_channels, num_classes, kernel_size=1)
    if zero:
        # The paper zero-initialises the skip score layers, so a fused net starts as its coarser parent.
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return layer


class FCN(nn.Module):
    """FCN-32s/16s/8s returning logits ``(N, num_classes, *spatial)`` at input resolution."""

    def __init__(
        self, in_channels: int, num_classes: int, spatial_dims: int, config: FCNConfig | None = None
    ) -> None:
        super().__init__()
        cfg = config or FCNConfig()
        blocks.check_io(in_channels, num_classes, spatial_dims)
        self.config, self.in_channels, self.num_classes, self.spatial_dims = (
            cfg,
            in_channels,
            num_classes,
            spatial_dims,
        )
        self.required_multiple = 2**cfg.num_stages
        dims, num_skips = spatial_dims, _NUM_SKIPS[cfg.variant]

        self.stages = nn.ModuleList()
        channels = in_channels
        for stage, num_convs in enumerate(cfg.convs_per_stage):
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers.append(blocks.ConvNormAct(dims, channels, cfg.width(stage), cfg.norm, cfg.activation))
                channels = cfg.width(stage)
            layers.append(blocks.max_pool(dims))
            self.stages.append(nn.Sequential(*layers))
        self.fc6 = nn.Sequential(
            blocks.conv(dims, channels, cfg.fc_width, cfg.fc_kernel_size, padding=cfg.fc_kernel_size // 2),
            blocks.activation(cfg.activation),
            blocks.dropout(cfg.fc_dropout_p),
        )
        self.fc7 = nn.Sequential(
            blocks.conv(dims, cfg.fc_width, cfg.fc_width, 1),
            blocks.activation(cfg.activation),
            blocks.dropout(cfg.fc_dropout_p),
        )
        self.score_fr = blocks.conv(dims, cfg.fc_width, num_classes, kernel_size=1)
        if num_skips >= 1:
            self.upscore2 = _upsample(dims, num_classes, 2)
            self.score_pool4 = _score(dims, cfg.width(cfg.num_stages - 2), num_classes, zero=True)
        if num_skips >= 2:
            self.upscore_pool4 = _upsample(dims, num_classes, 2)
            self.score_pool3 = _score(dims, cfg.width(cfg.num_stages - 3), num_classes, zero=True)
        self.upscore = _upsample(dims, num_classes, 2 ** (cfg.num_stages - num_skips))
        self._init_weights()
        if cfg.weights_path is not None:
            blocks.load_weights(self, cfg.weights_path)

    def _init_weights(self) -> None:
        """He init for the encoder and fc layers; score layers keep theirs, upsampling stays bilinear."""
        slope = blocks.LEAKY_RELU_SLOPE if self.config.activation == "leaky_relu" else 0.0
        for module in (self.stages, self.fc6, self.fc7):
            blocks.init_he(module, slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, *spatial)`` at the input's spatial size."""
        blocks.check_input(
            x, f"FCN-{self.config.variant}", self.in_channels, self.spatial_dims, self.required_multiple
        )
        pools = []
        for stage in self.stages:
            x = stage(x)
            pools.append(x)
        score = self.score_fr(self.fc7(self.fc6(x)))
        num_skips = _NUM_SKIPS[self.config.variant]
        if num_skips >= 1:
            score = self.upscore2(score) + self.score_pool4(pools[-2])
        if num_skips >= 2:
            score = self.upscore_pool4(score) + self.score_pool3(pools[-3])
        return self.upscore(score)
