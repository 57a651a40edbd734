"""The paper's architecture table, measured by running the models."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from rsscene.models.resnet import ARCHS, create_model

STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")


@dataclass
class ArchSummary:
    arch: str
    variant: str
    block: str
    blocks_per_stage: list[int]
    img_size: int
    num_classes: int
    stage_sizes: list[int]
    params: int
    gflops: float  # multiply-adds, as the paper counts them

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(
    arch: str, variant: str = "v1.5", num_classes: int = 1000, img_size: int = 224
) -> ArchSummary:
    """Parameters, per-stage output size and GFLOPs (multiply-adds) of one configuration."""
    model = create_model(arch, num_classes=num_classes, variant=variant).eval()
    params = sum(p.numel() for p in model.parameters())
    sizes: list[int] = []
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for name in STAGES
    ]
    # Meta tensors carry shapes only, so even ResNet-152 is counted without computing anything.
    model = model.to("meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, img_size, img_size, device="meta"))
    for h in hooks:
        h.remove()
    block, layers = ARCHS[arch]
    return ArchSummary(
        arch=arch,
        variant=variant,
        block=block.__name__,
        blocks_per_stage=list(layers),
        img_size=img_size,
        num_classes=num_classes,
        stage_sizes=sizes,
        params=params,
        gflops=counter.get_total_flops() / 2e9,
    )


def format_table(rows: list[ArchSummary]) -> str:
    """A plain-text table in the layout of the paper's Table 1."""
    header = ["arch", "block", "blocks per stage", "output sizes", "params", "GFLOPs"]
    lines = [
        [
            r.arch,
            r.block,
            " ".join(map(str, r.blocks_per_stage)),
            " ".join(map(str, r.stage_sizes)),
            f"{r.params:,}",
            f"{r.gflops:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)
