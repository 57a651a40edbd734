"""The training step's own ceiling: images/s of one step on tensors already in memory (no
data pipeline), for each optimizer implementation, with oneDNN's own weight gradient for
every conv (not ``rsscene.models.conv``'s products) and with ``torch.compile``, side by side.

    python benchmarks/step.py                      # ResNet-18, 128 px, batch 64, bf16 if fast
    python benchmarks/step.py --img-size 224 --rounds 5

Every variant trains the same model from the same weights on the same batch; the variants
take turns, one timed block each per round, so that a noisy neighbour slows all of them
alike. ``torch.compile``'s compile time is measured apart (its first steps) and turned into
the number of steps after which it has paid for itself. Inference (``predict``'s batch of
twice the training batch, no gradients) is timed eager and compiled the same way. Then, per
conv shape of the model at this size that ``rsscene.models.conv.Conv2d`` has a product for,
the weight gradient alone: oneDNN's against that product, on every map size.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rsscene.config import OPTIMIZER_DEFAULTS
from rsscene.device import amp_dtype, autocast, select_device, synchronize
from rsscene.engine.recipe import param_groups
from rsscene.models import create_model
from rsscene.models.conv import Conv2d

# The AdamW implementations torch offers: a Python loop over the parameters (its default on
# a CPU), one multi-tensor ("foreach") kernel per operation, and one fused kernel in all.
OPTIMIZERS = {
    "AdamW, for-loop (torch's CPU default)": {"foreach": False},
    "AdamW, foreach": {"foreach": True},
    "AdamW, fused": {"fused": True},
}
ONEDNN_GRADS = "AdamW, fused, oneDNN's weight gradients everywhere"
# Conv2d.small_map settings: oneDNN's weight gradient on every map, the product on every map.
ONEDNN, EVERY_MAP = 0, 10**9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="as train's")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="turns each variant takes")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    return p.parse_args(argv)


class Step:
    """One training step of a model copy with its own optimizer, ready to be timed."""

    def __init__(
        self,
        model: nn.Module,
        options: dict,
        compiled: bool,
        amp: torch.dtype | None,
        device: torch.device,
        small_map: int | None = None,
    ) -> None:
        self.model = copy.deepcopy(model)
        if small_map is not None:
            for m in self.model.modules():
                if isinstance(m, Conv2d):
                    m.small_map = small_map
        lr, wd = OPTIMIZER_DEFAULTS["adamw"]["lr"], OPTIMIZER_DEFAULTS["adamw"]["weight_decay"]
        groups = param_groups(self.model, wd, False)
        self.optimizer = torch.optim.AdamW(groups, lr=lr, **options)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.amp, self.device = amp, device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(self.device, self.amp):
            loss = F.cross_entropy(self.forward(x).float(), y, label_smoothing=0.1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / n


def first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn``'s first two calls (where torch.compile compiles)."""
    return timed(fn, 2, device) * 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device(args.device)
    amp = amp_dtype(args.amp, device)
    model = create_model(args.arch, num_classes=10).to(device, memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    variants = {name: Step(model, opts, False, amp, device) for name, opts in OPTIMIZERS.items()}
    variants[ONEDNN_GRADS] = Step(model, {"fused": True}, False, amp, device, ONEDNN)
    if not args.no_compile:
        variants["torch.compile + AdamW, fused"] = Step(model, {"fused": True}, True, amp, device)

    def train(step: Step) -> Callable[[], None]:
        return lambda: step(x, y)

    infer_x = torch.cat([x, x])
    eager_eval = copy.deepcopy(model).eval()
    infer = {"eager": eager_eval}
    if not args.no_compile:
        infer["torch.compile"] = torch.compile(copy.deepcopy(model).eval())

    def predict(net: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, amp):
                net(infer_x)

        return run

    print(
        f"{args.arch}, {args.img_size} px, batch {args.batch_size}, {device}, amp"
        f" {str(amp).replace('torch.', '')}, channels_last, {torch.get_num_threads()} threads"
    )
    warm = {name: first_call(train(s), device) for name, s in variants.items()}
    warm |= {f"infer {name}": first_call(predict(n), device) for name, n in infer.items()}
    times: dict[str, list[float]] = {name: [] for name in warm}
    for _ in range(args.rounds):
        for name, s in variants.items():
            times[name].append(timed(train(s), args.steps, device))
        for name, net in infer.items():
            times[f"infer {name}"].append(timed(predict(net), args.steps, device))

    base_train, base_infer = next(iter(variants)), "infer eager"
    # Compiling repays against the same step uncompiled: the fused AdamW's gain is its own.
    uncompiled = {"torch.compile + AdamW, fused": "AdamW, fused", "infer torch.compile": base_infer}
    print(
        "\n| step | images/s | x the first row of its kind | first two calls"
        " | steps to repay compiling |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, t in times.items():
        per = statistics.median(t)
        base = statistics.median(times[base_infer if name.startswith("infer") else base_train])
        batch = 2 * args.batch_size if name.startswith("infer") else args.batch_size
        repay = "-"
        if name in uncompiled:
            saved = statistics.median(times[uncompiled[name]]) - per
            extra = warm[name] - 2 * per
            repay = f"{extra / saved:.0f}" if saved > 0 else "never (slower)"
        print(f"| {name} | {batch / per:.1f} | {base / per:.2f} | {warm[name]:.1f} s | {repay} |")
    weight_grads(model, x, amp, device, args)
    return 0


def weight_grads(
    model: nn.Module, x: torch.Tensor, amp: torch.dtype | None, device: torch.device, args
) -> None:
    """Per conv shape the model meets on ``x`` that ``Conv2d`` has a product for: its weight
    gradient alone, oneDNN's and that product's, each the median of ``args.rounds`` blocks."""
    inputs: dict[tuple, tuple[Conv2d, torch.Tensor]] = {}

    def keep(m: nn.Module, args_: tuple) -> None:
        shape = (m.kernel_size[0], m.stride[0], m.in_channels, m.out_channels, *args_[0].shape[2:])
        inputs.setdefault(shape, (m, args_[0].detach()))

    convs = [m for m in model.modules() if isinstance(m, Conv2d) and m.product_key]
    hooks = [m.register_forward_pre_hook(keep) for m in convs]
    with torch.no_grad(), autocast(device, amp):
        model(x)
    for h in hooks:
        h.remove()
    print("\n| conv (kernel/stride, in, out, input map) | oneDNN's weight gradient | product | x |")
    print("|---|---:|---:|---:|")
    for shape, (m, inp) in inputs.items():
        per = {}
        for small_map in (ONEDNN, EVERY_MAP):
            conv = copy.deepcopy(m).to(memory_format=torch.channels_last)
            conv.small_map = small_map

            with autocast(device, amp):
                out = conv(inp)

            def grad(out: torch.Tensor = out, conv: Conv2d = conv) -> None:
                torch.autograd.grad(out, conv.weight, torch.ones_like(out), retain_graph=True)

            grad()
            per[small_map] = statistics.median(
                timed(grad, args.steps, device) for _ in range(args.rounds)
            )
        ms = {k: 1000 * v for k, v in per.items()}
        k, s, cin, cout, h, w = shape
        ours, theirs = ms[EVERY_MAP], ms[ONEDNN]
        name = f"{k}x{k}/{s}, {cin}, {cout}, {h}x{w}"
        print(f"| {name} | {theirs:.1f} ms | {ours:.1f} ms | {ours / theirs:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
