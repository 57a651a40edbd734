"""torchrun in training: DDP and SyncBatchNorm. Joining the job (:func:`setup`) and its
collectives (:class:`Dist`) live in :mod:`rsscene.device`, which map uses too."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rsscene.device import Dist, setup, teardown, world_size

__all__ = [
    "CpuSyncBatchNorm",
    "Dist",
    "convert_sync_batchnorm",
    "setup",
    "teardown",
    "world_size",
    "wrap",
]


def wrap(net: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """What the training step calls: ``net`` under DDP when a process group is joined (its
    gradients are averaged over the ranks), else ``net`` itself."""
    if not dist.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None
    )


# --------------------------------------------------------------------------- SyncBatchNorm
class _AllSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are over the global batch, on CPU with Gloo.

    torch's SyncBatchNorm runs on accelerators only (and DDP refuses it on CPU). Same
    parameters, buffers and state_dict keys as ``nn.BatchNorm2d``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(input)
        x = input.float()
        dims, shape = [0, 2, 3], [1, -1, 1, 1]
        # Two passes (mean, then centred squares) as in plain BatchNorm: E[x²] - E[x]² would
        # lose precision to cancellation.
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        totals = _AllSum.apply(local)
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        var = _AllSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            )
            with torch.no_grad():
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(net: nn.Module, device_type: str) -> nn.Module:
    """``net`` with every BatchNorm normalising over the global batch (for ``--sync-bn``)."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            # The subclass changes forward only, not the state, so retyping in place is safe.
            m.__class__ = CpuSyncBatchNorm
    return net
