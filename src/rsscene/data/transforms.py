"""Batch transforms on uint8 tensors: training augmentation, evaluation, test-time augmentation.

Images arrive as batches ``B x C x S x S`` in the data's dtype (uint8 RGB, or the bands of
multi-band files, from the decoded cache or from the per-image loader) and leave as
normalised float batches, on whatever device they are on.
Random resized crop, the eight flips/rotations of the square and scale jitter are folded
into one affine warp per image, so a whole batch is augmented by a single ``grid_sample``
call: cheap on a CPU and on a GPU alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ImageNet statistics: the convention torchvision weights expect, and a fine default for
# aerial RGB from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The model's input is clipped to +-this many standard deviations (scaled units when not
# standardised): far beyond any real pixel, and far below what overflows float32 (or bf16)
# through a ResNet. A finite float32 pixel at 3e38 would otherwise become inf when divided by a
# standard deviation under 1, and inf - inf inside the network is NaN.
INPUT_LIMIT = 1e6

# The dihedral group of the square as 2x2 matrices acting on (x, y): 4 rotations, then
# the same after a horizontal flip. affine_grid maps output to input coordinates, so a warp
# by the k-th is :func:`dihedral`'s inverse of k: rotations 1 and 3 trade places.
_D4 = (
    ((1, 0), (0, 1)),
    ((0, 1), (-1, 0)),
    ((-1, 0), (0, -1)),
    ((0, -1), (1, 0)),
    ((-1, 0), (0, 1)),
    ((0, 1), (1, 0)),
    ((1, 0), (0, -1)),
    ((0, -1), (-1, 0)),
)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device``, copied from the host without waiting for the GPU.

    A plain host-to-GPU ``.to()`` synchronises the stream, so a few small tensors per step
    would stall the training loop; a copy from pinned memory is queued instead.
    """
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@functools.cache
def _constant(values: tuple, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """A small float32 table on ``device``, made once: building it on a GPU at every step
    would be a host-to-device copy per step. Made outside inference mode even when first
    asked for inside it, since training uses it too."""
    with torch.inference_mode(False):
        return to_device(torch.tensor(values, dtype=torch.float32).view(shape), device)


def normalize(
    x: Tensor,
    enabled: bool = True,
    mean: Sequence[float] | None = MEAN,
    std: Sequence[float] | None = STD,
    scale: float = 255.0,
) -> Tensor:
    """Pixels (uint8, or any dtype in its own units) → float divided by ``scale`` (0..1 for
    8-bit), then standardised per band by ``mean``/``std`` if enabled, then clipped to
    ±:data:`INPUT_LIMIT`: finite pixels give a finite input (NaN stays NaN)."""
    x = x.float().div_(scale)
    if enabled and mean is not None:
        shape = (1, x.shape[1], 1, 1)
        mean = _constant(tuple(map(float, mean)), shape, x.device)
        std = _constant(tuple(map(float, std)), shape, x.device)
        x = x.sub_(mean).div_(std)
    # After the division: an overflow to +-inf there is clipped too.
    return x.clamp_(-INPUT_LIMIT, INPUT_LIMIT)


def dihedral(x: Tensor, k: int) -> Tensor:
    """The k-th of the 8 flips/rotations of a batch ``B x C x H x W`` (k = 0 is identity)."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def resize_batch(x: Tensor, size: int) -> Tensor:
    """Antialiased resize of a float batch to ``size`` x ``size`` (no-op when already there)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class Augment:
    """Per-image random augmentation for a training batch.

    ``scale`` and ``ratio`` are RandomResizedCrop's (area fraction and aspect range of the
    crop); ``dihedral`` draws one of the 8 flips/rotations, ``hflip`` only a horizontal
    flip (the tutorial's); ``jitter`` is the strength of brightness/contrast/saturation jitter
    for 8-bit RGB, and of per-band brightness/contrast for other bands (``rgb`` False).
    ``mean``, ``std`` and ``pixel_scale`` standardise the result (:func:`normalize`).

    The draws come from ``generator`` on its own device: a CUDA generator keeps them on the
    GPU (no copy from the host per step); a CPU one draws on the CPU, as on a CPU run.
    """

    size: int
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    dihedral: bool = True
    hflip: bool = False
    jitter: float = 0.0
    crop: bool = True
    normalize: bool = True
    rgb: bool = True
    mean: Sequence[float] | None = MEAN
    std: Sequence[float] | None = STD
    pixel_scale: float = 255.0

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b = x.shape[0]
        dev = x.device
        x = x.float()
        if self.crop or self.dihedral or self.hflip:
            theta = to_device(self._affine(b, generator), dev)
            grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
            # Only downsample with antialiasing first when the warp would skip pixels.
            if x.shape[-1] > 2 * self.size:
                x = resize_batch(x, 2 * self.size)
            x = F.grid_sample(
                x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )
        else:
            x = resize_batch(x, self.size)
        if self.jitter > 0:
            x = self._jitter(x, generator) if self.rgb else self._band_jitter(x, generator)
        if self.rgb:
            x = x.clamp_(0, 255)
        return normalize(x, self.normalize, self.mean, self.std, self.pixel_scale)

    def _affine(self, b: int, g: torch.Generator) -> Tensor:
        on = g.device

        def uniform(lo: float, hi: float) -> Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=g, device=on)

        if self.crop:
            area = uniform(*self.scale)
            log_r = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
            aspect = torch.exp(log_r)
            w = torch.sqrt(area * aspect).clamp(max=1.0)
            h = torch.sqrt(area / aspect).clamp(max=1.0)
        else:
            w = h = torch.ones(b, device=on)
        if self.dihedral:
            k = torch.randint(0, 8, (b,), generator=g, device=on)
        elif self.hflip:
            k = torch.randint(0, 2, (b,), generator=g, device=on) * 4
        else:
            k = torch.zeros(b, dtype=torch.long, device=on)
        # B x 2 x 2, from the table on k's device: it names its GPU, a CUDA generator's may not.
        d = _constant(_D4, (8, 2, 2), k.device)[k]
        lin = d * torch.stack([w, h], 1).unsqueeze(1)  # D @ diag(w, h)
        extent = lin.abs().sum(2)  # half-size of the sampled box along x and y
        centre = (2 * torch.rand(b, 2, generator=g, device=on) - 1) * (1 - extent).clamp(min=0)
        return torch.cat([lin, centre.unsqueeze(2)], 2)

    def _jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        b = x.shape[0]
        s = self.jitter

        def factor() -> Tensor:
            u = torch.rand(b, 1, 1, 1, generator=g, device=g.device)
            return to_device(1 + s * (2 * u - 1), x.device)

        x = x * factor()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factor() + mean
        grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        return (x - grey) * factor() + grey

    def _band_jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Brightness and contrast drawn for each band of each image: no band mixes into
        another, as saturation would (it has no meaning beyond red, green and blue)."""
        b, c = x.shape[:2]

        def factor() -> Tensor:
            u = torch.rand(b, c, 1, 1, generator=g, device=g.device)
            return to_device(1 + self.jitter * (2 * u - 1), x.device)

        x = x * factor()
        mean = x.mean(dim=(2, 3), keepdim=True)
        return (x - mean) * factor() + mean


def eval_batch(
    x: Tensor,
    size: int,
    normalize_input: bool = True,
    mean: Sequence[float] | None = MEAN,
    std: Sequence[float] | None = STD,
    scale: float = 255.0,
) -> Tensor:
    """The deterministic evaluation transform: resize to ``size``, scale, normalise."""
    return normalize(resize_batch(x.float(), size), normalize_input, mean, std, scale)


def tta_logits(model: torch.nn.Module, x: Tensor) -> Tensor:
    """Log of the mean softmax over the 8 flips/rotations of a prepared batch."""
    probs = torch.stack([model(dihedral(x, k)).float().softmax(1) for k in range(8)])
    return probs.mean(0).log()
