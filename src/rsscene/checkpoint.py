"""Save checkpoints atomically, load them safely.

A checkpoint is a plain dict of tensors and primitives, written with ``torch.save`` to a
temporary file, fsynced and renamed over the target, so ``last.pt`` is always either the
previous complete file or the new complete one. It carries a SHA-256 of the model weights,
checked on load. Loading always uses ``weights_only=True``: a file that would run code
when unpickled is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rsscene.errors import UserError

FORMAT = "rsscene-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or of the wrong kind."""


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a state_dict, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION}
    if "model" in payload:
        payload["sha256"] = weights_digest(payload["model"])
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    # A process killed mid-save leaves its temp file; the next save of the same name removes it.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors for every way it can fail."""
    path = Path(path)
    if path.is_dir():
        for name in ("last.pt", "best.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path}: a folder without last.pt or best.pt")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names the global a crafted file asks for; any other refusal is plain damage.
        unsafe = re.search(r"GLOBAL (\S+)", str(e))
        if unsafe:
            raise CheckpointError(
                f"{path}: refused as unsafe: it asks for {unsafe.group(1)}, which weights-only"
                " loading does not allow; such a file may run code when unpickled, so it is"
                " not loaded"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint, corrupt or not a checkpoint at all"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:
        # A damaged zip or pickle fails anywhere inside torch.load (KeyError, IndexError,
        # TypeError, UnicodeDecodeError...): all of them mean the file is unusable.
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable checkpoint, corrupt or truncated"
            f" ({type(e).__name__}: {detail[:200]})"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from an rsscene checkpoint or a torchvision-format ``.pth`` file."""
    obj = read(path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise CheckpointError(f"{path}: holds no model weights (state_dict)")


def load(path: str | Path) -> dict[str, Any]:
    """Read and verify an rsscene checkpoint (weights checksum, required fields)."""
    ckpt = read(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an rsscene checkpoint (plain torchvision weights can only start a"
            " training run: rsscene train --weights FILE)"
        )
    for key in ("model", "arch", "class_names"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    model, names = ckpt["model"], ckpt["class_names"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state_dict of tensors")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: its 'class_names' entry is not a list of names")
    if ckpt.get("sha256") and weights_digest(ckpt["model"]) != ckpt["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the weights are corrupt")
    return ckpt


def build_model(ckpt: dict[str, Any]) -> nn.Module:
    """The model a checkpoint describes, with its weights loaded, in eval mode."""
    from rsscene.models import create_model

    try:
        model = create_model(
            ckpt["arch"], num_classes=len(ckpt["class_names"]), variant=ckpt.get("variant", "v1.5")
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint describes no model rsscene can build: {e}") from None
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit {ckpt['arch']}: {str(e)[:300]}") from None
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint file or run folder; returns (model in eval mode, checkpoint dict)."""
    ckpt = load(path)
    return build_model(ckpt), ckpt
