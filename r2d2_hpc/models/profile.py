"""Model size and cost: parameter counts and forward FLOPs per sample.

FLOP convention: 1 multiply-accumulate (MAC) = 2 FLOPs, counted for convolutions, transposed convolutions and
linear layers only (biases, normalisation, activations, pooling, dropout and additions are left out; they are a
few percent at most). The count is that of one forward pass of one sample in eval mode; a training step costs
about 3x that (forward + backward for activations and weights).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of ``module`` for a batch of one sample."""
    if isinstance(module, _CONVS):
        # Every output element sums (in_channels / groups) x kernel volume products.
        kernel_volume = math.prod(module.kernel_size)
        return output[0].numel() * (module.in_channels // module.groups) * kernel_volume
    if isinstance(module, _CONV_TRANSPOSES):
        # Every input element is scattered to (out_channels / groups) x kernel volume outputs.
        kernel_volume = math.prod(module.kernel_size)
        return inputs[0][0].numel() * (module.out_channels // module.groups) * kernel_volume
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def flops_per_sample(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs (2 x MACs, see the module doc) of one sample of shape ``input_shape`` = ``(C, *spatial)``.

    Runs the forward pass of a batch of 1 on the meta device: the parameters and buffers are replaced by meta
    tensors of the same shapes (``torch.func.functional_call``), so only shapes are computed, no arithmetic and
    no memory, in milliseconds even for a 3D U-Net whose real forward costs a TFLOP. It runs in eval mode and
    without gradients, with forward hooks on every conv, transposed conv and linear layer; the model's own
    tensors and its train/eval mode are left as they were.
    """
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in named}
    total_macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total_macs
        total_macs += _macs(module, inputs, output)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (*_CONVS, *_CONV_TRANSPOSES, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            sample = torch.zeros((1, *input_shape), device="meta", dtype=dtype)
            torch.func.functional_call(model, meta, (sample,), strict=False)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * total_macs
