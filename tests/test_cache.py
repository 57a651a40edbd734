"""The decoded cache: same pixels as a direct decode, rebuilt exactly when it must be."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsscene.checkpoint import load
from rsscene.cli import main
from rsscene.data import datasets
from rsscene.data.datasets import (
    BatchLoader,
    DecodedCache,
    chunks,
    list_images,
    resolve_cache_mode,
)
from rsscene.data.images import load_tensor
from rsscene.data.synthetic import generate

SIZE = 36  # not the scenes' own size, so the cache has to resize


@pytest.fixture
def folder(tmp_path) -> Path:
    """A few scenes of its own that a test may change, with the cache folder beside it.

    The dot in the name once made every cache of such a folder share one file name."""
    generate(tmp_path / "scenes.v1", per_class=2, size=48, seed=2, classes=("ship", "bridge"))
    return tmp_path / "scenes.v1"


def _direct(images: datasets.ImageList, size: int) -> torch.Tensor:
    return torch.stack([load_tensor(p, size) for p in images.paths])


def _cache_files(folder: Path) -> list[Path]:
    return sorted((folder.parent / ".rsscene-cache").glob("*.u8"))


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_matches_direct_decode(split, mode):
    images = list_images(split / "train")
    cache = DecodedCache(images, SIZE, mode)
    assert cache.images.shape == (len(images), 3, SIZE, SIZE)
    assert cache.images.dtype == torch.uint8
    assert torch.equal(cache.images, _direct(images, SIZE))
    assert cache.labels.tolist() == images.labels


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_batches_match_per_image_decoding(split, mode):
    images = list_images(split / "train")
    order = chunks(
        torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist(), 6
    )
    direct = list(BatchLoader(images, SIZE, "none").batches(order))
    cached = list(BatchLoader(images, SIZE, mode).batches(order))
    assert len(direct) == len(cached) == len(order)
    for a, b in zip(direct, cached, strict=True):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.index, b.index)


def test_disk_cache_reused_when_nothing_changed(folder, monkeypatch):
    images = list_images(folder)
    first = DecodedCache(images, SIZE, "disk")
    [built] = _cache_files(folder)
    stamp = built.stat().st_mtime_ns

    def no_decoding(*args, **kwargs):
        raise AssertionError("an unchanged cache was rebuilt")

    monkeypatch.setattr(DecodedCache, "_fill", no_decoding)
    again = DecodedCache(list_images(folder), SIZE, "disk")
    assert _cache_files(folder) == [built]
    assert built.stat().st_mtime_ns == stamp
    assert torch.equal(again.images, first.images)


def test_disk_cache_rebuilt_when_an_image_changes(folder):
    images = list_images(folder)
    before = DecodedCache(images, SIZE, "disk").images.clone()
    path = images.paths[1]
    Image.fromarray(np.full((48, 48, 3), (200, 30, 90), np.uint8)).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    after = DecodedCache(list_images(folder), SIZE, "disk")
    assert torch.equal(after.images[1], load_tensor(path, SIZE))
    assert not torch.equal(after.images[1], before[1])
    assert torch.equal(after.images[0], before[0])
    assert len(_cache_files(folder)) == 1  # the outdated build is gone


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_unreadable_files_are_left_out(folder, mode):
    images = list_images(folder)
    images.paths[2].write_bytes(b"not an image")
    cache = DecodedCache(images, SIZE, mode)
    kept = [p for i, p in enumerate(images.paths) if i != 2]
    assert cache.paths == kept
    assert cache.labels.tolist() == [images.labels[i] for i in range(len(images)) if i != 2]
    assert [path for path, _ in cache.skipped] == [str(images.paths[2])]
    assert torch.equal(cache.images, torch.stack([load_tensor(p, SIZE) for p in kept]))


def test_disk_cache_rebuilt_when_the_size_changes(folder):
    images = list_images(folder)
    DecodedCache(images, SIZE, "disk")
    other = DecodedCache(images, 32, "disk")
    assert other.images.shape[-2:] == (32, 32)
    assert torch.equal(other.images, _direct(images, 32))
    assert len(_cache_files(folder)) == 2


def test_disk_cache_falls_back_to_the_user_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    monkeypatch.setattr(datasets.os, "access", lambda path, mode: False)
    cache = DecodedCache(list_images(folder), SIZE, "disk")
    assert list((tmp_path / "home-cache" / "rsscene").glob("*.u8"))
    assert torch.equal(cache.images, _direct(list_images(folder), SIZE))


def test_auto_picks_memory_for_small_sets(monkeypatch):
    assert resolve_cache_mode("auto", 20, 48) == "memory"
    # 3,500 images at 256 px need 688 MB: memory where a quarter of free RAM holds it, else disk.
    monkeypatch.setattr(datasets, "_available_memory", lambda: 16 << 30)
    assert resolve_cache_mode("auto", 3500, 256) == "memory"
    monkeypatch.setattr(datasets, "_available_memory", lambda: 2 << 30)
    assert resolve_cache_mode("auto", 3500, 256) == "disk"
    assert resolve_cache_mode("none", 20, 48) == "none"


def _train(split: Path, out: Path, cache: str) -> dict[str, torch.Tensor]:
    args = [
        "train",
        str(split),
        "--arch",
        "resnet18",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--img-size",
        "32",
        "--augment",
        "none",
        "--crop-scale",
        "1,1",
        "--jitter",
        "0",
        "--amp",
        "off",
        "--deterministic",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--cache",
        cache,
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return load(out / "last.pt").model


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """``--deterministic`` turns on a process-wide switch; put it back for the other tests."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_cached_and_uncached_training_reach_the_same_weights(
    split, tmp_path, one_thread, restore_determinism
):
    uncached = _train(split, tmp_path / "none", "none")
    for cache in ("memory", "disk"):
        cached = _train(split, tmp_path / cache, cache)
        assert uncached.keys() == cached.keys()
        for name in uncached:
            torch.testing.assert_close(
                cached[name], uncached[name], atol=0, rtol=0, msg=f"{cache}: {name}"
            )
