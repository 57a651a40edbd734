"""Weights into models: torchvision files, rsscene checkpoints and torchvision's ImageNet weights.

Every file is read by :mod:`rsscene.checkpoint` with ``weights_only=True``; nothing here
downloads except :func:`load_pretrained`, and only into torchvision's own cache.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, CheckpointError
from rsscene.errors import UserError
from rsscene.models.resnet import ResNet, create_model

# torchvision names its files NAME-HASH.pth, HASH the start of the file's SHA-256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")


# Wrappers whose weights hold a ResNet under a prefix: DDP and torch.compile around any model;
# MoCo's query encoder and the "backbone." of many self-supervised and detection checkpoints.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ENCODER_PREFIXES = ("encoder_q.", "backbone.")


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip the ``module.`` / ``_orig_mod.`` prefixes that DDP and torch.compile add; when the
    keys hold an encoder under ``encoder_q.`` or ``backbone.``, keep that encoder alone."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in out):
            return {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB filters (``O x 3 x k x k``) for ``in_channels`` bands, by the rule timm and
    torchgeo use: summed for one band; otherwise repeated over the bands and scaled by
    3 / bands, which keeps the size of the first activations (exactly, for a grey input and a
    multiple of 3 bands)."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(
            f"the first convolution has {weight.shape[1]} input bands, the model {in_channels};"
            " only RGB (3-band) weights are adapted"
        )
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    repeats = math.ceil(in_channels / 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3 / in_channels)


def load_backbone(model: ResNet, state: dict[str, Tensor]) -> list[str]:
    """Load ``state`` into ``model``; the classifier is re-initialised when the state has none
    or one of another shape (or another head, such as a self-supervised projection), and RGB
    first-convolution weights are adapted to the model's bands (:func:`adapt_first_conv`).

    Returns the names of the keys that were not taken from ``state`` (empty when the
    checkpoint matched exactly). Any other mismatch raises, as ``strict=True`` would.
    """
    state = clean_state_dict(state)
    own = model.state_dict()
    conv = state.get("conv1.weight")
    if conv is not None and conv.shape[1] != own["conv1.weight"].shape[1]:
        state["conv1.weight"] = adapt_first_conv(conv, own["conv1.weight"].shape[1])
    reinit = [
        k for k in ("fc.weight", "fc.bias") if k not in state or state[k].shape != own[k].shape
    ]
    # A head that is not this classifier (another size, or an MLP's fc.0/fc.2) is left out.
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and reinit)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ beyond the classifier and the first conv
        raise ValueError(f"weights do not fit {type(model).__name__}: {str(e)[:300]}") from None
    if unexpected or set(missing) != set(reinit):
        raise ValueError(
            f"weights do not fit {type(model).__name__}: missing {sorted(set(missing) - set(reinit))},"
            f" unexpected {sorted(unexpected)}"
        )
    if reinit:
        model.fc.reset_parameters()
    return reinit


def from_weights(
    arch: str, path: str | Path, num_classes: int = 1000, **kwargs
) -> tuple[ResNet, list[str]]:
    """Build ``arch`` and load a local weights file into it; nothing is downloaded.

    Returns the model and the list of re-initialised keys (the classifier when its
    number of classes differs from the file's).
    """
    model = create_model(arch, num_classes=num_classes, **kwargs)
    reinit = load_backbone(model, checkpoint.read_state_dict(path))
    return model, reinit


def verified_state_dict(path: Path, hash_prefix: str) -> dict[str, Tensor]:
    """The weights in ``path`` once its SHA-256 starts with ``hash_prefix``, read weights-only."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(hash_prefix):
        raise UserError(
            f"{path}: its SHA-256 starts with {digest[: len(hash_prefix)]}, not {hash_prefix} as"
            " published: the file was replaced or damaged, so it is not loaded; delete it"
        )
    return checkpoint.read_state_dict(path)


def load_pretrained(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``arch`` from torchvision's cache (downloaded there
    when absent and online), checked against the published hash on every load."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).IMAGENET1K_V1
    name = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(cached), progress=False)
        except Exception as e:
            raise UserError(
                f"--pretrained: torchvision's ImageNet weights for {arch} are not in its cache"
                f" ({cached}) and could not be downloaded ({type(e).__name__}); fetch"
                f" {weights.url} on a connected machine and pass it with --weights PATH"
            ) from None
    return verified_state_dict(cached, _HASH_IN_NAME.search(name).group(1))


def model_from_checkpoint(ckpt: Checkpoint) -> ResNet:
    """The model a checkpoint describes, with its weights loaded, in eval mode."""
    try:
        model = create_model(
            ckpt.arch,
            num_classes=len(ckpt.class_names),
            variant=ckpt.variant,
            in_channels=ckpt.preprocess.channels,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint describes no model rsscene can build: {e}") from None
    try:
        model.load_state_dict(ckpt.model, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit {ckpt.arch}: {str(e)[:300]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[ResNet, Checkpoint]:
    """Load a checkpoint file or run folder; returns (model in eval mode, checkpoint)."""
    ckpt = checkpoint.load(path)
    return model_from_checkpoint(ckpt), ckpt
