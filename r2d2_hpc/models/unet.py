"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), 2D or 3D, with the options nnU-Net made common.

Differences from the paper, on purpose: convolutions use 'same' padding (so logits come out at input resolution and
no output cropping is needed), widths are capped by ``max_width``, and normalisation, LeakyReLU, strided-conv
downsampling and deep supervision are options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from r2d2_hpc.errors import ConfigError
from r2d2_hpc.models import blocks

DOWNSAMPLINGS = ("max_pool", "strided_conv")


@dataclass
class UNetConfig:
    """Options of the U-Net (``model.name=unet``)."""

    depth: int = 4  # number of 2x downsamplings; every spatial size must be a multiple of 2**depth
    base_width: int = 32  # channels at full resolution; doubled at each level down
    max_width: int = 512  # cap on the channels of any level (nnU-Net: 512 in 2D, 320 in 3D)
    norm: str = (
        "instance"  # batch | instance | group | none; instance keeps the model independent of batch split
    )
    activation: str = "leaky_relu"  # relu (paper) | leaky_relu (nnU-Net)
    downsample: str = "max_pool"  # max_pool (paper) | strided_conv (first conv of each level has stride 2)
    dropout_p: float = 0.0  # dropout probability after the bottleneck and after each decoder level
    deep_supervision: bool = False  # extra 1x1 heads at the lower-resolution decoder levels (training only)
    weights_path: str | None = None  # local state dict to load after building (strict); None: random init

    def __post_init__(self) -> None:
        if not 1 <= self.depth <= 7:
            raise ConfigError(
                f"model.depth={self.depth} must be between 1 and 7 (number of 2x downsamplings)"
            )
        if self.base_width < 1 or self.max_width < self.base_width:
            raise ConfigError(
                f"model.base_width={self.base_width} must be >= 1 and model.max_width={self.max_width} >= base_width"
            )
        blocks.check_choice("model.norm", self.norm, blocks.NORMS)
        blocks.check_choice("model.activation", self.activation, blocks.ACTIVATIONS)
        blocks.check_choice("model.downsample", self.downsample, DOWNSAMPLINGS)
        if not 0.0 <= self.dropout_p < 1.0:
            raise ConfigError(f"model.dropout_p={self.dropout_p} must be in [0, 1)")

    def width(self, level: int) -> int:
        """Channels at ``level`` (0 = full resolution, ``depth`` = bottleneck)."""
        return min(self.base_width * 2**level, self.max_width)


class _DoubleConv(nn.Sequential):
    """Two ConvNormAct; the first may downsample with stride 2."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, cfg: UNetConfig, stride: int = 1) -> None:
        super().__init__(
            blocks.ConvNormAct(dims, in_ch, out_ch, cfg.norm, cfg.activation, stride=stride),
            blocks.ConvNormAct(dims, out_ch, out_ch, cfg.norm, cfg.activation),
        )


class UNet(nn.Module):
    """U-Net returning logits ``(N, num_classes, *spatial)`` at input resolution.

    With ``deep_supervision`` and in training mode, ``forward`` returns a list
    ``[full-res logits, 1/2-res logits, ..., 1/2**(depth-1)-res logits]``: the loss must downsample the labels
    (nearest) to each size. In eval mode it always returns the full-resolution tensor.
    """

    def __init__(
        self, in_channels: int, num_classes: int, spatial_dims: int, config: UNetConfig | None = None
    ) -> None:
        super().__init__()
        cfg = config or UNetConfig()
        blocks.check_io(in_channels, num_classes, spatial_dims)
        self.config, self.in_channels, self.num_classes, self.spatial_dims = (
            cfg,
            in_channels,
            num_classes,
            spatial_dims,
        )
        self.required_multiple = 2**cfg.depth
        dims, strided = spatial_dims, cfg.downsample == "strided_conv"

        self.pools = nn.ModuleList(
            [nn.Identity() if strided else blocks.max_pool(dims) for _ in range(cfg.depth)]
        )
        # encoders[0] works at full resolution; encoders[depth] is the bottleneck.
        self.encoders = nn.ModuleList([_DoubleConv(dims, in_channels, cfg.width(0), cfg)])
        for level in range(1, cfg.depth + 1):
            stride = 2 if strided else 1
            self.encoders.append(
                _DoubleConv(dims, cfg.width(level - 1), cfg.width(level), cfg, stride=stride)
            )
        self.bottleneck_dropout = blocks.dropout(cfg.dropout_p)
        # ups[level] / decoders[level] bring level+1 up to level (index 0 ends at full resolution).
        self.ups = nn.ModuleList(
            [
                blocks.conv_transpose(dims, cfg.width(level + 1), cfg.width(level), kernel_size=2, stride=2)
                for level in range(cfg.depth)
            ]
        )
        self.decoders = nn.ModuleList(
            [_DoubleConv(dims, 2 * cfg.width(level), cfg.width(level), cfg) for level in range(cfg.depth)]
        )
        self.decoder_dropouts = nn.ModuleList([blocks.dropout(cfg.dropout_p) for _ in range(cfg.depth)])
        self.head = blocks.conv(dims, cfg.width(0), num_classes, kernel_size=1)
        # aux_heads[i] scores decoder level i + 1 (resolution 1/2**(i+1)).
        self.aux_heads = nn.ModuleList(
            [blocks.conv(dims, cfg.width(level), num_classes, kernel_size=1) for level in range(1, cfg.depth)]
            if cfg.deep_supervision
            else []
        )
        blocks.init_he(self, blocks.LEAKY_RELU_SLOPE if cfg.activation == "leaky_relu" else 0.0)
        if cfg.weights_path is not None:
            blocks.load_weights(self, cfg.weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits at input resolution (or the deep-supervision list in training mode, see the class doc)."""
        blocks.check_input(x, "UNet", self.in_channels, self.spatial_dims, self.required_multiple)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else self.pools[level - 1](x))
            skips.append(x)
        x = self.bottleneck_dropout(skips.pop())
        want_aux = self.training and len(self.aux_heads) > 0
        aux_logits: list[torch.Tensor] = []
        for level in reversed(range(len(self.decoders))):
            x = self.ups[level](x)
            x = self.decoders[level](torch.cat([skips[level], x], dim=1))
            x = self.decoder_dropouts[level](x)
            if want_aux and level > 0:
                aux_logits.append(self.aux_heads[level - 1](x))
        logits = self.head(x)
        if want_aux:
            return [logits, *reversed(aux_logits)]
        return logits
