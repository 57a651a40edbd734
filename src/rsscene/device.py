"""Device and precision: one place for training, evaluation, predict, cam, map, serve and
benchmarks; and the torchrun job a process belongs to (:func:`setup`), for train and map."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rsscene.errors import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA, then MPS, then CPU) or a device name, refused where it is absent."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(
            f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's MPS backend is not available here")
    return device


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 (AVX-512 BF16 or AMX); elsewhere bf16 is slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` on this device, or None for float32."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; float32 (no context) when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_workers() -> int:
    """Decoding processes: the CPUs this process may use, shared among torchrun's local ranks."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic algorithms when asked (slower); else let cuDNN pick its fastest kernels."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


# --------------------------------------------------------------------------- torchrun
def world_size() -> int:
    """The number of processes torchrun started (1 when run without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def dist_timeout() -> float:
    """Seconds a rank waits for the others before it gives up: ``RSSCENE_DIST_TIMEOUT_MIN``
    minutes (default 10), so that a job whose rank hangs or died ends instead of waiting."""
    return float(os.environ.get("RSSCENE_DIST_TIMEOUT_MIN", 10)) * 60


@dataclass
class Dist:
    """This process's place in the torchrun job, and the collectives train and map use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    # A process group was joined: under torchrun, even with one process (DDP, SyncBN and the
    # collectives then run as with several).
    enabled: bool = False
    # The job's key-value store (torchrun's), for waits longer than a collective's timeout.
    store: Any = field(default=None, repr=False, compare=False)
    # Seconds to wait for a silent rank (setup: RSSCENE_DIST_TIMEOUT_MIN).
    timeout: float = field(default=600.0, repr=False, compare=False)
    waits: int = field(default=0, repr=False, compare=False)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU (``cuda:LOCAL_RANK``) under torchrun on CUDA."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

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

    def beat(self) -> None:
        """Tell the ranks waiting in :meth:`wait_for_all` that this one is still working."""
        if self.enabled and self.store is not None:
            self.store.add(f"beat/{self.rank}", 1)

    def wait_for_all(self) -> None:
        """Wait until every rank calls this too, however long they work, as long as each
        beats (:meth:`beat`) at least once per timeout: a rank silent for longer (hung,
        stopped, dead) ends the wait with an error naming it. Polls the store, so that Ctrl-C
        and SIGTERM stop a waiting rank at once, which a collective does not."""
        if not self.enabled or self.store is None:
            return self.barrier()
        self.waits += 1
        keys = [f"wait-{self.waits}/{r}" for r in range(self.world)]
        self.store.set(keys[self.rank], "1")
        heard = {r: (-1, time.monotonic()) for r in range(self.world)}
        while not self.store.check(keys):
            now = time.monotonic()
            for r in range(self.world):
                beats = self.store.add(f"beat/{r}", 0)
                if beats != heard[r][0] or self.store.check([keys[r]]):
                    heard[r] = (beats, now)
                elif now - heard[r][1] > self.timeout:
                    raise UserError(
                        f"rank {r} of {self.world} was not heard from for {self.timeout:.0f} s"
                        " (RSSCENE_DIST_TIMEOUT_MIN sets the limit); this rank gives up"
                    )
            time.sleep(0.1)


def setup(device_type: str) -> Dist:
    """Join the process group torchrun describes (from WORLD_SIZE, RANK and LOCAL_RANK); NCCL
    on CUDA (each rank on ``cuda:LOCAL_RANK``), Gloo on CPU. Without torchrun, a Dist of one
    process and no group. Every collective gives up after :func:`dist_timeout`."""
    world = world_size()
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_id = None
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    store = None
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=dist_timeout())
        # torchrun keeps its store across --max-restarts: without a prefix of their own, the
        # restarted processes can read the dead ones' addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(
            f"rsscene/attempt-{attempt}", next(dist.rendezvous("env://", timeout=timeout))[0]
        )
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device_id,
        )
    return Dist(rank, world, local_rank, enabled=True, store=store, timeout=dist_timeout())


def teardown() -> None:
    """Leave the process group, where one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
