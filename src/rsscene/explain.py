"""Grad-CAM (Selvaraju et al. 2017): which parts of an image drove a class's score.

A forward hook keeps one layer's feature map; the gradient of the class score with respect
to it, averaged over space, weighs its channels; the weighted sum, through a ReLU and
upsampled to the input, is the map. :func:`overlay_png` and :func:`figure_png` draw it over
the image as the model saw it: RGB as it is, other bands as a chosen triple with a
percentile stretch, a model of one or two bands in grey (:func:`rsscene.data.bands.render_rgb`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from rsscene.data.bands import render_rgb
from rsscene.data.images import ImageError
from rsscene.errors import UserError
from rsscene.inference import Predictor, collect_images

DEFAULT_LAYER = "layer4"


def layer_choices(model: nn.Module) -> list[str]:
    """The stages (``layer1`` ...) and their blocks (``layer4.2`` ...): the sensible targets."""
    return [
        name
        for name, _ in model.named_modules()
        if name.startswith("layer") and name.count(".") <= 1
    ]


def find_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module called ``name`` (dotted, as in ``named_modules``); ``layer4`` by default."""
    name = name or DEFAULT_LAYER
    modules = dict(model.named_modules())
    if name not in modules:
        raise UserError(
            f"no layer {name!r} in this model; choose one of {', '.join(layer_choices(model))}"
            " (or any module inside them, e.g. layer4.1.conv2)"
        )
    return modules[name]


def gradcam(
    model: nn.Module, x: Tensor, class_idx: int | None = None, layer: str | None = None
) -> tuple[Tensor, int, Tensor]:
    """Grad-CAM of one prepared image (``CxHxW`` or ``1xCxHxW``, normalised as for the model).

    Returns (map ``HxW`` in 0..1 on the CPU, the class explained, class probabilities):
    the class is the predicted one unless ``class_idx`` is given.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"gradcam takes one image (CxHxW or 1xCxHxW), got {tuple(x.shape)}")
    saved: list[Tensor] = []
    # A module called several times per forward (a block's shared ReLU) keeps its last output.
    handle = find_layer(model, layer).register_forward_hook(lambda m, i, out: saved.append(out))
    try:
        with torch.enable_grad():
            # Gradients must reach the feature map even if the weights are frozen.
            logits = model(x.detach().requires_grad_(True))
            if not saved or saved[-1].dim() != 4:
                raise UserError(f"layer {layer or DEFAULT_LAYER!r} does not output a feature map")
            probs = logits.detach().float().softmax(1)[0]
            idx = int(probs.argmax()) if class_idx is None else int(class_idx)
            if not 0 <= idx < probs.numel():
                raise ValueError(f"class index {idx} out of range 0..{probs.numel() - 1}")
            # autograd.grad rather than backward(): no .grad is left on the model's weights,
            # so a model shared with other callers (the server) is not touched.
            (grads,) = torch.autograd.grad(logits[0, idx], saved[-1])
    finally:
        handle.remove()
    acts = saved[-1].detach()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    return cam.cpu(), idx, probs.cpu()


def overlay(image: Tensor, cam: Tensor, alpha: float = 0.45) -> np.ndarray:
    """The map in the turbo colormap blended over a uint8 ``3xHxW`` image → ``HxWx3`` uint8."""
    from matplotlib import colormaps

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    if cam.shape != image.shape[-2:]:
        cam = F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear")[0, 0]
    heat = colormaps["turbo"](cam.clamp(0, 1).numpy())[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb + alpha * heat, 0, 255).astype(np.uint8)


def image_png(image: Tensor) -> bytes:
    """A uint8 ``3xHxW`` image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def overlay_png(image: Tensor, cam: Tensor) -> bytes:
    """:func:`overlay` as PNG bytes (what the web page shows)."""
    return image_png(torch.from_numpy(overlay(image, cam)).permute(2, 0, 1))


def figure_png(image: Tensor, cam: Tensor, title: str) -> bytes:
    """The image and its Grad-CAM overlay side by side under ``title``, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4.4))
    left.imshow(image.permute(1, 2, 0).numpy())
    left.set_title("image")
    right.imshow(overlay(image, cam))
    right.set_title("Grad-CAM")
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def explain(
    predictor: Predictor,
    image: Tensor,
    class_idx: int | None = None,
    layer: str | None = None,
    tta: bool = False,
) -> tuple[Tensor, int, Tensor]:
    """Grad-CAM of an image loaded by ``predictor``; with ``tta`` the class and the
    probabilities come from the 8 flips/rotations (the map is of the image as it is)."""
    probs = None
    if tta:
        probs = predictor.probabilities([image], tta=True)[0]
        class_idx = int(probs.argmax()) if class_idx is None else class_idx
    cam, idx, plain = gradcam(predictor.model, predictor.prepare([image]), class_idx, layer)
    return cam, idx, plain if probs is None else probs


def class_index(classes: list[str], name: str | None) -> int | None:
    """The index of class ``name`` (None stays None), or a UserError listing the classes."""
    if name is None:
        return None
    if name not in classes:
        raise UserError(f"unknown class {name!r}; this model knows {', '.join(classes)}")
    return classes.index(name)


def title(classes: list[str], idx: int, probs: Tensor) -> str:
    """A figure title: ``predicted ship 93.1%``, plus the explained class if another."""
    top = int(probs.argmax())
    text = f"predicted {classes[top]} {probs[top]:.1%}"
    if idx != top:
        text += f"; explaining {classes[idx]} {probs[idx]:.1%}"
    return text


def write_cams(
    predictor: Predictor,
    paths: list[str | Path],
    out: str | Path,
    class_name: str | None = None,
    layer: str | None = None,
    tta: bool = False,
) -> tuple[list[Path], list[tuple[str, str]]]:
    """One ``NAME_cam.png`` figure in ``out`` per readable image among ``paths`` (files or
    folders); returns (files written, [(input, reason)] for those skipped)."""
    class_idx = class_index(predictor.classes, class_name)
    find_layer(predictor.model, layer)  # a bad --layer fails before any work
    predictor.pre.display_bands()  # and so do bands that cannot be shown
    files, errors = collect_images(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for path in files:
        try:
            image = predictor.load(path)
        except ImageError as e:
            errors.append((str(path), e.reason))
            continue
        cam, idx, probs = explain(predictor, image, class_idx, layer, tta)
        name = f"{path.stem}_cam.png"
        n = 1
        while name in taken:  # same stem in two folders
            n += 1
            name = f"{path.stem}_{n}_cam.png"
        taken.add(name)
        target = out / name
        shown = render_rgb(image, predictor.pre)
        target.write_bytes(figure_png(shown, cam, title(predictor.classes, idx, probs)))
        written.append(target)
    return written, errors
