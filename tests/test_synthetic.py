"""Tests for the procedural aerial-scene generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsscene.data.synthetic import CLASSES, generate, image_rng, render_scene


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_classes_are_the_tutorials_five() -> None:
    assert CLASSES == ("airplane", "bridge", "palace", "ship", "stadium")


def test_layout_and_counts(tmp_path: Path) -> None:
    counts = generate(tmp_path, per_class=3, size=40, seed=1)
    assert counts == dict.fromkeys(CLASSES, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == list(CLASSES)
    for cls in CLASSES:
        names = sorted(p.name for p in (tmp_path / cls).iterdir())
        assert names == [f"{cls}_{i:04d}.png" for i in (1, 2, 3)]


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", per_class=2, size=48, seed=7)
    generate(tmp_path / "b", per_class=2, size=48, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 2 * len(CLASSES)
    assert a == b


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", per_class=2, size=48, seed=7)
    generate(tmp_path / "b", per_class=2, size=48, seed=8)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_more_images_or_fewer_classes_keep_existing_ones(tmp_path: Path) -> None:
    generate(tmp_path / "small", per_class=2, size=40, seed=3)
    generate(tmp_path / "big", per_class=3, size=40, seed=3)
    generate(tmp_path / "ships", per_class=2, size=40, seed=3, classes=["ship"])
    small, big, ships = (_files(tmp_path / d) for d in ("small", "big", "ships"))
    assert all(big[k] == v for k, v in small.items())
    assert ships == {k: v for k, v in small.items() if k.startswith("ship")}


def test_jpg_format_is_deterministic_rgb(tmp_path: Path) -> None:
    counts = generate(tmp_path / "a", per_class=1, size=64, seed=0, fmt="jpg")
    generate(tmp_path / "b", per_class=1, size=64, seed=0, fmt="jpg")
    assert counts == dict.fromkeys(CLASSES, 1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    with Image.open(tmp_path / "a" / "ship" / "ship_0001.jpg") as img:
        assert img.format == "JPEG"
        assert img.mode == "RGB"
        assert img.size == (64, 64)


def test_written_images_are_rgb_of_the_requested_size(tmp_path: Path) -> None:
    generate(tmp_path, per_class=2, size=56, seed=2)
    for path in tmp_path.rglob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert img.size == (56, 56)


@pytest.mark.parametrize("cls", CLASSES)
def test_bounding_boxes_lie_inside_and_are_not_trivial(cls: str) -> None:
    size = 64
    ci = CLASSES.index(cls)
    for i in range(12):
        img, (x0, y0, x1, y1) = render_scene(cls, size, image_rng(11, ci, i))
        assert img.size == (size, size)
        assert img.mode == "RGB"
        assert 0 <= x0 < x1 <= size
        assert 0 <= y0 < y1 <= size
        # The object spans a fair part of the image but never fills it.
        longest = max(x1 - x0, y1 - y0)
        assert 0.15 * size <= longest <= 0.7 * size


def test_render_scene_is_deterministic() -> None:
    a, box_a = render_scene("palace", 48, np.random.default_rng(5))
    b, box_b = render_scene("palace", 48, np.random.default_rng(5))
    assert box_a == box_b
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ["airplane", "submarine"]}, "unknown class"),
        ({"per_class": 0}, "per_class"),
        ({"size": 31}, "size"),
        ({"fmt": "gif"}, "format"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **{"per_class": 1, "size": 32, **kwargs})
    assert not any(tmp_path.iterdir())


def test_render_scene_rejects_bad_arguments() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown class 'harbour'"):
        render_scene("harbour", 64, rng)
    with pytest.raises(ValueError, match="size"):
        render_scene("ship", 16, rng)


def _mean_colours(seed: int, n: int, size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    feats, labels = [], []
    for ci, cls in enumerate(CLASSES):
        for i in range(n):
            img, _ = render_scene(cls, size, image_rng(seed, ci, i))
            feats.append(np.asarray(img, np.float64).mean(axis=(0, 1)))
            labels.append(ci)
    return np.array(feats), np.array(labels)


def test_class_is_not_decidable_from_mean_colour() -> None:
    train_x, train_y = _mean_colours(seed=100, n=40)
    test_x, test_y = _mean_colours(seed=101, n=40)
    centroids = np.stack([train_x[train_y == k].mean(axis=0) for k in range(len(CLASSES))])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float((dist.argmin(axis=1) == test_y).mean())
    assert accuracy < 0.6
