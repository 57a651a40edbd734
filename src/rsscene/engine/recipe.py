"""The recipe's pure functions: parameter groups, optimizer, schedule, augmentation, mixup and
the seeds that make every step's randomness a function of (seed, epoch, step, rank)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from rsscene import checkpoint
from rsscene.config import TrainConfig
from rsscene.data.bands import Preprocess
from rsscene.data.datasets import TrainData, chunks
from rsscene.data.transforms import Augment, to_device
from rsscene.device import default_workers
from rsscene.engine import distributed
from rsscene.errors import UserError
from rsscene.models import (
    ResNet,
    clean_state_dict,
    create_model,
    load_backbone,
    load_pretrained,
)


def split_data(cfg: TrainConfig, device: torch.device, progress: bool) -> TrainData:
    """The split ``cfg.data`` names, its training images stored at the largest size an epoch
    trains or tests at."""
    return TrainData.from_split(
        cfg.data,
        store_size=max(cfg.img_size, cfg.eval_size),
        eval_size=cfg.eval_size,
        cache=cfg.cache,
        workers=default_workers() if cfg.workers is None else cfg.workers,
        device=device,
        strict=cfg.strict,
        progress=progress,
        bands=cfg.bands,
        normalize=cfg.normalize,
    )


def build_model(
    cfg: TrainConfig, num_classes: int, load_weights: bool = True, in_channels: int = 3
) -> tuple[ResNet, str | None]:
    """The model ``cfg`` starts from, for ``in_channels`` bands: built, with ``--weights`` or
    ``--pretrained`` loaded (unless not ``load_weights``) and the backbone frozen if asked;
    with a note to print saying what was re-initialised or adapted."""
    model = create_model(
        cfg.arch,
        num_classes=num_classes,
        variant=cfg.variant,
        zero_init_residual=cfg.zero_init_residual,
        in_channels=in_channels,
    )
    note = None
    if load_weights and (cfg.weights or cfg.pretrained):
        if cfg.weights:
            start, source = checkpoint.read_state_dict(cfg.weights), cfg.weights
        else:
            start, source = load_pretrained(cfg.arch), f"torchvision {cfg.arch} ImageNet weights"
        conv = clean_state_dict(start).get("conv1.weight")
        try:
            reinit = load_backbone(model, start)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"--weights {source}: {str(e)[:300]}") from None
        changes = []
        if reinit:
            changes.append(f"re-initialised {', '.join(reinit)} for {num_classes} classes")
        if conv is not None and conv.shape[1] != in_channels:
            how = "summed" if in_channels == 1 else f"repeated over the bands, x 3/{in_channels}"
            changes.append(f"adapted conv1 from {conv.shape[1]} to {in_channels} bands ({how})")
        if changes:
            note = f"loaded {source}; " + "; ".join(changes)
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model, note


def place_model(
    model: nn.Module, cfg: TrainConfig, device: torch.device, dist: distributed.Dist
) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """``model`` made ready to train as ``cfg`` says: ``(net, ema, forward)``, the model on
    the device (SyncBatchNorm under torchrun with ``--sync-bn``, channels_last), its EMA
    (None without ``--ema``), and what a step calls (DDP, compiled with ``--compile``)."""
    if cfg.sync_bn and dist.enabled:
        model = distributed.convert_sync_batchnorm(model, device.type)
    net = model.to(device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = None
    if cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    forward = distributed.wrap(net, dist, device)
    return net, ema, torch.compile(forward, mode=cfg.compile_mode) if cfg.compile else forward


def param_groups(model: nn.Module, weight_decay: float, wd_norm_bias: bool) -> list[dict]:
    """Weight decay on conv/linear weights only, unless ``wd_norm_bias`` (as in timm)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 or wd_norm_bias else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, over ``model``'s trainable parameters (``cfg`` resolved)."""
    groups = param_groups(model, cfg.weight_decay, cfg.wd_norm_bias)
    # One fused kernel for the whole update: 4% faster steps than torch's CPU default (a
    # Python loop over the parameters), measured by benchmarks/step.py; CPU and CUDA have it.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.optimizer == "sgd":
        nesterov = cfg.momentum > 0
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=fused
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    return torch.optim.Adam(groups, lr=cfg.lr, fused=fused)


def _positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


def class_weights(spec: str, classes: list[str], labels: Tensor) -> Tensor | None:
    """The loss weight of each class: ``none`` (None), ``balanced`` (n / (classes x n_class),
    so that every class weighs as much in the loss as the others) or a YAML/JSON file that
    maps every class name to a positive weight."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = torch.bincount(labels, minlength=len(classes)).double()
        return (counts.sum() / (len(classes) * counts.clamp(min=1))).float()
    try:
        given = yaml.safe_load(Path(spec).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"--class-weights {spec}: cannot read ({str(e).splitlines()[0]})") from None
    if not isinstance(given, dict) or set(map(str, given)) != set(classes):
        raise UserError(
            f"--class-weights {spec}: expected a mapping of exactly the classes {classes} to"
            f" weights, got {sorted(map(str, given)) if isinstance(given, dict) else given!r}"
        )
    weights = {str(k): v for k, v in given.items()}
    bad = [c for c in classes if not _positive_number(weights[c])]
    if bad:
        raise UserError(
            f"--class-weights {spec}: the weight of {bad[0]!r} is not a positive number"
        )
    return torch.tensor([float(weights[c]) for c in classes])


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then the schedule's decay."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return 0.05 + 0.95 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "onecycle":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n: int, batch_size: int, dist: distributed.Dist) -> int:
    """Optimisation steps in an epoch of ``n`` images, ``batch_size`` per process (a last
    partial global batch is dropped)."""
    if n < dist.world:
        raise UserError(f"{n} training images cannot be shared among {dist.world} processes")
    # BatchNorm's training statistics need two images; a step of one raises deep in torch.
    if min(n, batch_size * dist.world) // dist.world < 2:
        each = "" if dist.world == 1 else f" among {dist.world} processes"
        hint = "add training images" if n < 2 * dist.world else "give --batch-size 2 or more"
        raise UserError(
            f"{n} training image{'s' if n != 1 else ''}{each}: a step needs at least 2 images"
            f" per process (BatchNorm's statistics): {hint}"
        )
    return len(chunks(list(range(n)), batch_size * dist.world, drop_last=True))


def train_mode(forward: nn.Module, net: nn.Module, freeze_backbone: bool) -> None:
    """Training mode, but for a frozen backbone's BatchNorm, whose statistics stay fixed."""
    forward.train()
    if freeze_backbone:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``cfg.schedule`` over ``cfg.epochs`` epochs of ``steps_per_epoch`` steps, stepped per step."""
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    schedule = cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, schedule)
    )


def make_augment(cfg: TrainConfig, pre: Preprocess, size: int) -> Augment:
    """The batch augmentation ``cfg`` describes, to ``size`` pixels (the epoch's
    :func:`train_size`), standardising as ``pre`` says."""
    return Augment(
        size,
        scale=cfg.crop_scale,
        dihedral=cfg.augment == "dihedral",
        hflip=cfg.augment == "hflip",
        jitter=cfg.jitter,
        crop=cfg.crop_scale != (1.0, 1.0),
        normalize=cfg.normalize,
        rgb=pre.bands is None,
        mean=pre.mean,
        std=pre.std,
        pixel_scale=pre.scale,
    )


def train_size(cfg: TrainConfig, epoch: int) -> int:
    """The training resolution of ``epoch`` (0-based). With progressive resizing it stays at
    ``cfg.start_size`` until the ramp, rises linearly in steps of 16 px, and reaches
    ``cfg.img_size`` at the ramp's end (the low-resolution epochs cost a fraction of a full
    one, and the last ones train at the resolution the model is tested at)."""
    if cfg.start_size is None:
        return cfg.img_size
    first, last = (f * cfg.epochs for f in cfg.ramp)
    t = min(1.0, max(0.0, (epoch - first) / max(last - first, 1e-9)))
    if t in (0.0, 1.0):
        return cfg.img_size if t == 1.0 else cfg.start_size
    size = 16 * round((cfg.start_size + t * (cfg.img_size - cfg.start_size)) / 16)
    return min(max(size, cfg.start_size), cfg.img_size)


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for one step of one rank (``step`` -1: the epoch's permutation)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_batches(
    n: int,
    global_batch: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    labels: Tensor | None = None,
) -> list[list[int]]:
    """This rank's share of each global batch of the epoch's permutation of ``n`` images.

    Every rank draws the same permutation, so the global batches are those of one process
    with a batch of ``global_batch``. With ``labels`` (the class-balanced sampler) the epoch
    is ``n`` draws with replacement, each class equally likely: still a function of (seed,
    epoch) alone, so a resumed run draws the same batches.
    """
    g = torch.Generator().manual_seed(step_seed(seed, epoch, -1, 0))
    if labels is None:
        perm = torch.randperm(n, generator=g).tolist()
    else:
        per_image = 1.0 / torch.bincount(labels)[labels].double()
        perm = torch.multinomial(per_image, n, replacement=True, generator=g).tolist()
    global_batches = chunks(perm, global_batch, drop_last=True)
    return [b[rank * len(b) // world : (rank + 1) * len(b) // world] for b in global_batches]


def mix_batch(
    x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, g: torch.Generator
) -> Tensor:
    """Mixup or CutMix (one of them per batch, chosen at random) in place on ``x``; soft targets.

    With ``g`` on a GPU the permutation is drawn there, and the choice, λ and the box (host
    numbers, which a GPU draw would have to be synchronised for) come from a host generator
    seeded with ``g``'s seed: so give each batch a freshly seeded ``g``, as the Trainer does.
    """
    target = F.one_hot(y, num_classes).float()
    if mixup <= 0 and cutmix <= 0:
        return target
    host = g if g.device.type == "cpu" else torch.Generator().manual_seed(g.initial_seed())
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=host).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    gamma = torch.distributions.Gamma(torch.tensor([alpha, alpha]), torch.tensor([1.0, 1.0]))
    # Seed a private RNG for the Beta draw: torch.distributions only samples from the global one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=host)))
        a, b = gamma.sample().tolist()
    lam = a / (a + b)
    perm = to_device(torch.randperm(x.shape[0], generator=g, device=g.device), x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy = int(torch.randint(0, h, (1,), generator=host))
        cx = int(torch.randint(0, w, (1,), generator=host))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        other = x[perm].mul_(1 - lam)  # gathered before x is scaled in place, not after
        x.mul_(lam).add_(other)
    return target * lam + target[perm.to(target.device)] * (1 - lam)
