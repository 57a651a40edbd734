"""A convolution that trains faster on the CPU where oneDNN's weight gradient is slow.

On the CPU, oneDNN takes some convolutions' weight gradients 3 to 10 times longer than their
forward pass: for ResNet-18 at 96 to 128 px (a batch of 64 in bfloat16), the last stage's
3x3 convs on 3x3 or 4x4 maps, its stride-2 3x3 conv and the 1x1 stride-2 shortcuts. Each of
those gradients is itself one product that oneDNN runs at forward speed:

- 3x3, stride 1: the output's gradient, with the batch as its channels, correlated with the
  input as the kernel (flipped);
- 3x3, stride 2: the input, with the batch as its channels, correlated with the output's
  gradient as a kernel dilated by 2;
- 1x1, stride 2: one matrix product of the gradient and every second pixel of the input.

``benchmarks/step.py`` measures each against oneDNN's, per layer and in a whole step.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _flipped(x: Tensor, grad: Tensor) -> Tensor:
    # dW[o, i, u, v] = sum over n, h, w of dY[n, o, h, w] * X[n, i, h + u - 1, w + v - 1]:
    # dY with its batch as channels, correlated with X as the kernel, is dW flipped in u and
    # v. Taken this way round (not X by dY) the result comes out in the weight's
    # channels_last order, where a transposed copy would cost as much as oneDNN saves.
    lhs = grad.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    rhs = x.transpose(0, 1).contiguous(memory_format=torch.channels_last)
    return F.conv2d(lhs, rhs, None, 1, 1).flip(2, 3)


def _dilated(x: Tensor, grad: Tensor) -> Tensor:
    # dW[o, i, u, v] = sum over n, h, w of dY[n, o, h, w] * Xpad[n, i, 2h + u, 2w + v]: X with
    # its batch as channels, correlated with dY as a kernel dilated by 2. Xpad is X padded by
    # one pixel before and as many after as the last row and column of the kernel reach.
    h, w = grad.shape[2:]
    lhs = F.pad(x.transpose(0, 1), (1, 2 * w - x.shape[3], 1, 2 * h - x.shape[2]))
    return F.conv2d(lhs, grad.transpose(0, 1), None, 1, 0, 2).transpose(0, 1)


def _pointwise(x: Tensor, grad: Tensor, stride: int) -> Tensor:
    # dW[o, i] = sum over n, h, w of dY[n, o, h, w] * X[n, i, s h, s w]: one matrix product.
    n, o, h, w = grad.shape
    rows = x[:, :, ::stride, ::stride].permute(0, 2, 3, 1).reshape(n * h * w, -1)
    return (grad.permute(0, 2, 3, 1).reshape(n * h * w, o).t() @ rows)[:, :, None, None]


# (kernel, stride, padding) -> the weight gradient's product, and the largest output map in
# pixels it is taken for: where it measured faster on both machines it was timed on
# (benchmarks/step.py, bf16, batch 64, 2 cores with AVX-512 BF16; oneDNN's speed differs
# between them). 3x3 stride 1 gains 2-6x on 3x3 outputs, up to 1.5x on 6x6, loses on 8x8;
# 3x3 stride 2 gains 2.4-3.3x on 3x3 outputs, 1.9x on 4x4, loses on 6x6 on one machine; 1x1
# stride 2 gains 1.35-4.5x on 3x3 and 4x4 outputs, and on larger ones gains on one machine
# and loses up to 2.3x on the other.
WeightGrad = Callable[[Tensor, Tensor], Tensor]
WEIGHT_GRADS: dict[tuple[int, int, int], tuple[WeightGrad, int]] = {
    (3, 1, 1): (_flipped, 36),
    (3, 2, 1): (_dilated, 16),
    (1, 2, 0): (partial(_pointwise, stride=2), 16),
}


class _ConvWeightGrad(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding)`` whose weight gradient is the product
    ``WEIGHT_GRADS`` holds for its (kernel, stride, padding)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.key = (kernel, stride, padding)
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        _, s, p = ctx.key
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, (s, s), (p, p), (1, 1), False, (0, 0), 1,
                (True, False, False),
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            grad_weight = WEIGHT_GRADS[ctx.key][0](x, grad)
        return grad_x, grad_weight, None, None, None


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same results) that, while training on the CPU, takes
    its weight gradient as one forward-speed product where oneDNN's own is slow (see
    ``WEIGHT_GRADS``)."""

    # The largest output map for every kernel, in place of WEIGHT_GRADS's (0: oneDNN's
    # weight gradient everywhere).
    small_map: int | None = None

    @property
    def product_key(self) -> tuple[int, int, int] | None:
        """(kernel, stride, padding) where ``WEIGHT_GRADS`` holds a product for this conv's
        shape (square, no bias, groups, dilation or padding mode), else None."""
        key = (self.kernel_size[0], self.stride[0], self.padding[0])
        if (self.kernel_size, self.stride, self.padding) != tuple((v, v) for v in key):
            return None
        plain = self.bias is None and self.groups == 1 and self.padding_mode == "zeros"
        return key if key in WEIGHT_GRADS and plain and self.dilation == (1, 1) else None

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        key = self.product_key
        if key is None or not self._takes_product(key, x, weight):
            return super()._conv_forward(x, weight, bias)
        if torch.is_autocast_enabled("cpu"):
            # Autocast does not reach into an autograd.Function: cast as it would for conv2d.
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
        return _ConvWeightGrad.apply(x, weight, *key)

    def _takes_product(self, key: tuple[int, int, int], x: Tensor, weight: Tensor) -> bool:
        if not (self.training and torch.is_grad_enabled() and weight.requires_grad):
            return False
        if x.device.type != "cpu" or torch.jit.is_tracing():  # a trace would hold a Python op
            return False
        if x.dim() != 4:
            return False
        largest = WEIGHT_GRADS[key][1] if self.small_map is None else self.small_map
        kernel, stride, padding = key
        h, w = ((n + 2 * padding - kernel) // stride + 1 for n in x.shape[2:])
        return h * w <= largest
