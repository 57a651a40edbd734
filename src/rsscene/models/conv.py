"""A 3x3 convolution that trains faster on the CPU where its maps are small.

On the CPU, oneDNN takes a convolution's weight gradient on small maps 3 to 4 times longer
than its forward pass: for ResNet-18's last stage at 96 to 128 px (512 channels on 3x3 or 4x4
maps, a batch of 64 in bfloat16), 18-23 ms a layer. That gradient is itself a convolution, of
the output's gradient by the input with the batch as the channels, which oneDNN runs at
forward speed (3-5 ms). ``benchmarks/step.py`` measures both, per layer and in a whole step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Output maps of at most this many pixels take the weight gradient as a convolution over the
# batch: measured, 3x3 to 6x6 maps gain (512 channels 6x, 256 channels 1.5x), 12x12 loses.
SMALL_MAP = 36


class _BatchConvGrad(torch.autograd.Function):
    """A 3x3, stride 1, padding 1 ``F.conv2d(x, weight)`` whose weight gradient is one
    convolution over the batch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, 1, 1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                (True, False, False),
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            # dW[o, i, u, v] = sum over n, h, w of dY[n, o, h, w] * X[n, i, h + u - 1, w + v - 1]:
            # dY with its batch as channels, correlated with X as the kernel, is dW flipped in
            # u and v. Taken this way round (not X by dY) the result comes out in the weight's
            # channels_last order, where a transposed copy would cost as much as oneDNN saves.
            lhs = grad.transpose(0, 1).contiguous(memory_format=torch.channels_last)
            rhs = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
            grad_weight = F.conv2d(lhs, rhs, None, 1, 1).flip(2, 3)
        return grad_x, grad_weight


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same results) that, while training on the CPU, takes a
    3x3 stride-1 kernel's weight gradient on small maps as a convolution over the batch."""

    # The largest output map (in pixels) to do so for; 0 keeps oneDNN's everywhere.
    small_map: int = SMALL_MAP

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self._batch_conv_grad(x, weight, bias):
            if torch.is_autocast_enabled("cpu"):
                # Autocast does not reach into an autograd.Function: cast as it would for conv2d.
                dtype = torch.get_autocast_dtype("cpu")
                x, weight = x.to(dtype), weight.to(dtype)
            return _BatchConvGrad.apply(x, weight)
        return super()._conv_forward(x, weight, bias)

    def _batch_conv_grad(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
        if not (self.training and torch.is_grad_enabled() and weight.requires_grad):
            return False
        if x.device.type != "cpu" or torch.jit.is_tracing():  # a trace would hold a Python op
            return False
        same = (self.kernel_size, self.stride, self.padding, self.dilation) == (
            (3, 3), (1, 1), (1, 1), (1, 1),
        )  # fmt: skip
        plain = bias is None and self.groups == 1 and self.padding_mode == "zeros"
        return same and plain and x.dim() == 4 and x.shape[2] * x.shape[3] <= self.small_map
