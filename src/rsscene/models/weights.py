"""Weights into models: torchvision files, rsscene checkpoints and torchvision's ImageNet weights.

Every file is read by :mod:`rsscene.checkpoint` with ``weights_only=True``; nothing here
downloads except :func:`load_pretrained`, and only into torchvision's own cache.
"""

from __future__ import annotations

import hashlib
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


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip the ``module.`` / ``_orig_mod.`` prefixes that DDP and torch.compile add."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_backbone(model: ResNet, state: dict[str, Tensor]) -> list[str]:
    """Load ``state`` into ``model``; a classifier of another shape is re-initialised.

    Returns the names of the keys that were not taken from ``state`` (empty when the
    checkpoint matched exactly). Any other mismatch raises, as ``strict=True`` would.
    """
    state = clean_state_dict(state)
    own = model.state_dict()
    skipped = [k for k in ("fc.weight", "fc.bias") if k in state and state[k].shape != own[k].shape]
    if not skipped:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights do not fit {type(model).__name__}: {str(e)[:300]}") from None
        return []
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != set(skipped):
        raise ValueError(
            f"weights do not fit {type(model).__name__}: missing {sorted(set(missing) - set(skipped))},"
            f" unexpected {sorted(unexpected)}"
        )
    model.fc.reset_parameters()
    return skipped


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
        model = create_model(ckpt.arch, num_classes=len(ckpt.class_names), variant=ckpt.variant)
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
