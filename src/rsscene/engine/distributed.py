"""torchrun integration: process group set-up from the environment, and reductions."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """The number of processes torchrun started (1 when run without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place in the torchrun job, and the collectives the trainer uses."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # A process group was joined: under torchrun, even with one process (DDP, SyncBN and the
    # collectives then run as with several).
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place) of a tensor; a no-op outside torchrun."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (in place); a no-op outside torchrun."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, *modules: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank.

        DDP sends them before each forward, so after the last one each rank has its own.
        """
        if self.enabled:
            for module in modules:
                for b in module.buffers():
                    dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def wrap(net: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """What the training step calls: ``net`` under DDP when a process group is joined (its
    gradients are averaged over the ranks), else ``net`` itself."""
    if not dist.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None
    )


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes; NCCL on CUDA, Gloo on CPU."""
    world = world_size()
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_id = None
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("RSSCENE_DIST_TIMEOUT_MIN", 10)))
        store = next(dist.rendezvous("env://", timeout=timeout))[0]
        # torchrun keeps its store across --max-restarts: without a prefix of their own, the
        # restarted processes can read the dead ones' addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            store=dist.PrefixStore(f"rsscene/attempt-{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device_id,
        )
    return Dist(rank, world, local_rank, enabled=True)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
