"""``rsscene prepare``: exact, deterministic, stratified splits that leave bad files out."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsscene.cli import main
from rsscene.data.images import open_image
from rsscene.data.prepare import (
    ListedSplit,
    PerClassCounts,
    RatioSplit,
    SplitPlan,
    format_report,
    prepare,
)
from rsscene.errors import UserError

CLASSES = ["bridge", "forest", "harbor", "lake", "meadow"]
REAL = Path(__file__).parents[1].parent / "shared/data/nwpu45-2"


def _jpeg_bytes(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """5 classes x 12 distinct 32x32 JPEGs."""
    root = tmp_path_factory.mktemp("raw")
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir()
        for i in range(12):
            (root / cls / f"{cls}_{i:03d}.jpg").write_bytes(_jpeg_bytes(100 * c + i))
    return root


def _parts(dst: Path) -> dict[str, set[tuple[str, str]]]:
    return {
        part: {(p.parent.name, p.name) for p in (dst / part).glob("*/*")}
        for part in ("train", "val", "test")
        if (dst / part).is_dir()
    }


def _no_overlap(parts: dict[str, set[tuple[str, str]]]) -> None:
    names = list(parts.values())
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not names[i] & names[j]


# --------------------------------------------------------------------------- splits
def test_exact_counts(raw, tmp_path):
    r = prepare(raw, tmp_path / "out", train_per_class=8, test_per_class=3)
    assert r.classes == CLASSES
    assert r.counts == {c: {"train": 8, "test": 3} for c in CLASSES}
    assert r.unused == dict.fromkeys(CLASSES, 1)
    assert r.skipped == [] and r.duplicates == []
    parts = _parts(tmp_path / "out")
    assert set(parts) == {"train", "test"}
    for part, n in (("train", 8), ("test", 3)):
        for cls in CLASSES:
            assert sum(1 for c, _ in parts[part] if c == cls) == n
    _no_overlap(parts)
    manifest = json.loads(r.manifest_path.read_text())
    assert manifest["rsscene_split"] == 1 and manifest["source"] == str(raw.resolve())
    assert len(manifest["files"]) == 55
    keys = [(f["part"], f["class"], f["file"]) for f in manifest["files"]]
    assert keys == sorted(keys)
    # the copy is the file the manifest describes, under its original name
    f = manifest["files"][0]
    assert (tmp_path / "out" / f["file"]).read_bytes() == (raw / f["source"]).read_bytes()
    assert Path(f["file"]).name == Path(f["source"]).name
    assert "total" in format_report(r)


def test_ratio_counts_and_val(raw, tmp_path):
    r = prepare(raw, tmp_path / "a", test_ratio=0.25)
    assert r.counts == {c: {"train": 9, "test": 3} for c in CLASSES}
    # a tiny ratio still gives each class a test image
    r = prepare(raw, tmp_path / "b", test_ratio=0.01)
    assert all(c["test"] == 1 for c in r.counts.values())
    # adding val leaves test unchanged
    r = prepare(raw, tmp_path / "c", test_ratio=0.25, val_ratio=0.25)
    assert r.counts == {c: {"train": 6, "val": 3, "test": 3} for c in CLASSES}
    parts = _parts(tmp_path / "c")
    _no_overlap(parts)
    assert parts["test"] == _parts(tmp_path / "a")["test"]


def test_train_ratio_is_the_papers_protocol(raw, tmp_path):
    # 12 per class at a training ratio of 20%: round(2.4) = 2 train, the other 10 test.
    r = prepare(raw, tmp_path / "a", train_ratio=0.2, seed=3)
    assert r.counts == {c: {"train": 2, "test": 10} for c in CLASSES}
    r = prepare(raw, tmp_path / "b", train_ratio=0.5, val_ratio=0.25, seed=3)
    assert r.counts == {c: {"train": 6, "val": 3, "test": 3} for c in CLASSES}
    _no_overlap(_parts(tmp_path / "b"))
    # Another seed draws other training images.
    prepare(raw, tmp_path / "c", train_ratio=0.2, seed=4)
    assert _parts(tmp_path / "a")["train"] != _parts(tmp_path / "c")["train"]
    with pytest.raises(UserError, match="--train-ratio cannot be combined"):
        prepare(raw, tmp_path / "d", train_ratio=0.2, test_ratio=0.1)
    with pytest.raises(UserError, match="must leave room for testing"):
        prepare(raw, tmp_path / "d", train_ratio=0.8, val_ratio=0.2)


def test_a_split_file_reproduces_a_published_split(raw, tmp_path):
    listing = tmp_path / "published.txt"
    listing.write_text(
        "# part file\n"
        "train bridge/bridge_000.jpg\n"
        "train,forest_001.jpg\n"  # a bare name, as UC Merced's lists give them
        "test  bridge/bridge_005.jpg\n"
        "val forest/forest_002.jpg\n"
        "test forest/forest_003.jpg\n"
    )
    r = prepare(raw, tmp_path / "a", split_file=listing)
    assert r.classes == ["bridge", "forest"]
    assert _parts(tmp_path / "a") == {
        "train": {("bridge", "bridge_000.jpg"), ("forest", "forest_001.jpg")},
        "val": {("forest", "forest_002.jpg")},
        "test": {("bridge", "bridge_005.jpg"), ("forest", "forest_003.jpg")},
    }
    assert r.unused == {"bridge": 0, "forest": 0}
    # An rsscene split.json is a split list too: the same parts again, file for file.
    again = prepare(raw, tmp_path / "b", split_file=r.manifest_path)
    assert _parts(tmp_path / "b") == _parts(tmp_path / "a") and again.counts == r.counts


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ("train bridge/absent.jpg\ntest bridge/bridge_001.jpg\n", "not image files"),
        ("train bridge/bridge_000.jpg\ntest bridge/bridge_000.jpg\n", "listed twice"),
        ("training bridge/bridge_000.jpg\n", "published.txt:1: expected 'PART FILE'"),
        ("train bridge/bridge_000.jpg\n", "lists no test files"),
    ],
)
def test_a_bad_split_file_is_refused_in_one_line(raw, tmp_path, lines, error):
    listing = tmp_path / "published.txt"
    listing.write_text(lines)
    with pytest.raises(UserError, match=error):
        prepare(raw, tmp_path / "out", split_file=listing)
    assert not (tmp_path / "out").exists()


def test_split_plan_counts_each_mode_and_refuses_bad_combinations(raw, tmp_path):
    def counts(plan: SplitPlan, *sizes: int) -> list[tuple[int, int, int]]:
        return [(c["train"], c["val"], c["test"]) for c in map(plan.counts, sizes)]

    # No mode named: a test ratio of 0.1, rounded half up, at least 1 per class.
    default = SplitPlan.from_options()
    assert default == RatioSplit("test", 0.1)
    assert counts(default, 5, 12, 45) == [(4, 0, 1), (11, 0, 1), (40, 0, 5)]
    plan = SplitPlan.from_options(test_ratio=0.25, val_ratio=0.2)
    assert counts(plan, 7, 12) == [(4, 1, 2), (7, 2, 3)]
    assert plan.shortfall(3) is None
    assert plan.shortfall(2) == "too few for 1 test + 1 val + at least 1 train"
    assert plan.options() == {
        "train_per_class": None,
        "val_per_class": None,
        "test_per_class": None,
        "test_ratio": 0.25,
        "val_ratio": 0.2,
        "train_ratio": None,
    }
    # The training ratio sizes train; the rest tests.
    plan = SplitPlan.from_options(train_ratio=0.2)
    assert plan == RatioSplit("train", 0.2)
    assert counts(plan, 12, 100) == [(2, 0, 10), (20, 0, 80)]
    assert plan.shortfall(1) == "too few for 1 train + at least 1 test"
    assert plan.options()["train_ratio"] == 0.2 and plan.options()["test_ratio"] is None
    # Exact counts do not depend on the class size, only whether it can fill them.
    plan = SplitPlan.from_options(train_per_class=8, test_per_class=3, val_per_class=2)
    assert plan == PerClassCounts(8, 3, 2)
    assert counts(plan, 13, 40) == [(8, 2, 3), (8, 2, 3)]
    assert plan.shortfall(13) is None
    assert plan.shortfall(12) == "13 requested (8 train + 2 val + 3 test)"
    assert plan.options()["val_ratio"] is None
    assert PerClassCounts(8, 3).options()["val_per_class"] is None  # not asked, not 0
    # A split file gives every part; split.json records which file, by path and content.
    listing = tmp_path / "list.txt"
    listing.write_text("train bridge/bridge_000.jpg\ntest bridge/bridge_001.jpg\n")
    plan = SplitPlan.from_options(split_file=listing)
    assert plan == ListedSplit(listing)
    assert plan.options()["split_file"] == str(listing.resolve())
    assert len(plan.options()["split_file_sha256"]) == 64

    refused = "--test-ratio cannot be combined with --train-per-class/--test-per-class"
    with pytest.raises(UserError) as e:
        SplitPlan.from_options(train_per_class=8, test_per_class=3, test_ratio=0.1)
    assert str(e.value) == refused
    # prepare refuses it itself (the CLI need not), before it writes anything
    with pytest.raises(UserError) as e:
        prepare(raw, tmp_path / "out", train_per_class=8, test_per_class=3, test_ratio=0.1)
    assert str(e.value) == refused and not (tmp_path / "out").exists()
    for options, error in (
        ({"train_per_class": 8}, "must be given together"),
        ({"val_per_class": 2}, "--val-per-class needs"),
        ({"train_per_class": 8, "test_per_class": 3, "val_ratio": 0.1}, "use --val-per-class"),
        ({"split_file": listing, "val_ratio": 0.1}, "it takes no counts or ratios"),
        ({"test_ratio": 0.5, "val_ratio": 0.5}, "must leave room for training"),
        ({"train_per_class": 0, "test_per_class": 3}, "--train-per-class must be at least 1"),
    ):
        with pytest.raises(UserError, match=error):
            SplitPlan.from_options(**options)


def test_deterministic_and_seeded(raw, tmp_path):
    a = prepare(raw, tmp_path / "a", train_per_class=8, test_per_class=3, seed=1)
    b = prepare(raw, tmp_path / "b", train_per_class=8, test_per_class=3, seed=1)
    assert a.manifest_path.read_bytes() == b.manifest_path.read_bytes()
    prepare(raw, tmp_path / "c", train_per_class=8, test_per_class=3, seed=2)
    assert _parts(tmp_path / "a")["test"] != _parts(tmp_path / "c")["test"]
    # --classes picks a subset, whatever the case or order
    d = prepare(raw, tmp_path / "d", classes=["LAKE", "bridge"], test_ratio=0.25)
    assert d.classes == ["bridge", "lake"]


def test_modes(raw, tmp_path):
    prepare(raw, tmp_path / "s", classes=["lake"], mode="symlink", test_ratio=0.25)
    links = list((tmp_path / "s").glob("*/lake/*"))
    assert links and all(p.is_symlink() and os.path.isabs(os.readlink(p)) for p in links)
    prepare(raw, tmp_path / "h", classes=["lake"], mode="hardlink", test_ratio=0.25)
    assert all(p.stat().st_nlink > 1 for p in (tmp_path / "h").glob("*/lake/*"))


def test_force_replaces_only_its_own_split(raw, tmp_path):
    dst = tmp_path / "out"
    prepare(raw, dst, train_per_class=8, test_per_class=3)
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        prepare(raw, dst, train_per_class=4, test_per_class=2)
    r = prepare(raw, dst, train_per_class=4, test_per_class=2, force=True)
    assert len(list(dst.glob("train/*/*"))) == 20 and r.total("test") == 10
    assert (dst / "notes.txt").read_text() == "mine"
    # a file rsscene did not write in train/ blocks --force, and nothing is deleted
    (dst / "train" / "lake" / "extra.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="did not write"):
        prepare(raw, dst, train_per_class=4, test_per_class=2, force=True)
    assert len(list(dst.glob("train/*/*"))) == 21


def test_leakage_reported(tmp_path):
    src = tmp_path / "raw"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
    # two byte-identical files in a two-image class must land in train and test
    (src / "a" / "one.jpg").write_bytes(_jpeg_bytes(1))
    (src / "a" / "two.jpg").write_bytes(_jpeg_bytes(1))
    (src / "b" / "x.jpg").write_bytes(_jpeg_bytes(2))
    (src / "b" / "y.jpg").write_bytes(_jpeg_bytes(3))
    r = prepare(src, tmp_path / "out", train_per_class=1, test_per_class=1)
    assert len(r.duplicates) == 1 and r.leakage == r.duplicates
    assert {f.split("/")[0] for f in r.duplicates[0].files} == {"train", "test"}
    manifest = json.loads(r.manifest_path.read_text())
    assert manifest["duplicates"] == [r.duplicates[0].as_dict()]
    assert manifest["duplicates"][0]["kind"] == "leakage"
    assert "leakage" in format_report(r)


# --------------------------------------------------------------------------- bad files
@pytest.fixture
def salted(tmp_path) -> Path:
    src = tmp_path / "raw" / "mixed"
    src.mkdir(parents=True)
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_text("this is not a picture\n")
    whole = _jpeg_bytes(7, size=64)
    (src / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    grey16 = np.linspace(0, 65535, 32 * 32, dtype=np.uint16).reshape(32, 32)
    Image.fromarray(grey16).save(src / "grey16.tif")
    Image.new("P", (32, 32), 3).save(src / "palette.png")
    Image.new("RGBA", (32, 32), (10, 20, 30, 128)).save(src / "alpha.png")
    (src / "README.txt").write_text("notes")
    (src / ".DS_Store").write_bytes(b"\0")
    return src.parent


def test_bad_files_left_out_with_reasons(salted, tmp_path):
    with Image.open(salted / "mixed" / "grey16.tif") as im:
        assert im.mode.startswith("I;16")
    r = prepare(salted, tmp_path / "out", test_per_class=1, train_per_class=2)
    reasons = {s.file: s.reason for s in r.skipped}
    assert set(reasons) == {
        "mixed/empty.jpg",
        "mixed/text.png",
        "mixed/truncated.jpg",
        "mixed/README.txt",
    }
    assert reasons["mixed/empty.jpg"] == "empty file"
    assert "not an image" in reasons["mixed/text.png"]
    assert "truncated" in reasons["mixed/truncated.jpg"]
    assert reasons["mixed/README.txt"] == "not an image extension"
    kept = sorted(p.name for p in (tmp_path / "out").glob("*/mixed/*"))
    assert kept == ["alpha.png", "grey16.tif", "palette.png"]
    for p in (tmp_path / "out").glob("*/mixed/*"):
        assert open_image(p).mode == "RGB"
    manifest = json.loads(r.manifest_path.read_text())
    assert {s["file"] for s in manifest["skipped"]} == set(reasons)
    report = format_report(r)
    assert "mixed/truncated.jpg" in report and "left out 4" in report
    # bad files never take a slot: 3 good images cannot fill 4
    with pytest.raises(UserError, match=r"mixed has 3 good images, 4 requested"):
        prepare(salted, tmp_path / "out2", test_per_class=1, train_per_class=3)


def test_strict_raises(salted, tmp_path):
    with pytest.raises(UserError) as e:
        prepare(salted, tmp_path / "out", test_per_class=1, train_per_class=2, strict=True)
    msg = str(e.value)
    assert "mixed/empty.jpg: empty file" in msg and "mixed/truncated.jpg" in msg
    assert "mixed/text.png" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI errors
def _cli_error(capsys, argv: list[str], match: str) -> None:
    assert main(["prepare", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rsscene prepare: error:")
    assert "Traceback" not in err and match in err


def test_cli_errors(raw, tmp_path, capsys):
    _cli_error(capsys, [str(tmp_path / "nope"), str(tmp_path / "o")], "does not exist")
    (tmp_path / "file").write_text("x")
    _cli_error(capsys, [str(tmp_path / "file"), str(tmp_path / "o")], "not a folder")
    (tmp_path / "flat").mkdir()
    _cli_error(capsys, [str(tmp_path / "flat"), str(tmp_path / "o")], "no class folders")
    empty = tmp_path / "withempty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "x.jpg").write_bytes(_jpeg_bytes(1))
    (empty / "b").mkdir()
    _cli_error(capsys, [str(empty), str(tmp_path / "o")], "class folder b is empty")
    _cli_error(
        capsys, [str(raw), str(tmp_path / "o"), "--classes", "lake,desert"], "available: bridge"
    )
    _cli_error(capsys, [str(raw), str(raw / "sub")], "inside the source")
    _cli_error(capsys, [str(raw), str(tmp_path / "o"), "--train-per-class", "3"], "together")
    _cli_error(
        capsys,
        [str(raw), str(tmp_path / "o"), "--train-per-class", "10", "--test-per-class", "3"],
        "bridge has 12 good images, 13 requested",
    )
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _cli_error(capsys, [str(raw), str(full)], "not empty")
    assert not (tmp_path / "o").exists()


def test_cli_success(raw, tmp_path, capsys):
    argv = ["prepare", str(raw), str(tmp_path / "o"), "--test-ratio", "0.25", "--val-ratio", "0.2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val" in out and "total" in out and str(tmp_path / "o") in out
    assert json.loads((tmp_path / "o" / "split.json").read_text())["counts"]["lake"] == {
        "train": 7,
        "val": 2,
        "test": 3,
    }


# --------------------------------------------------------------------------- real images
@pytest.mark.skipif(
    not REAL.is_dir(), reason="real images not available: ../shared/data/nwpu45-2 is absent"
)
def test_real_nwpu(tmp_path):
    kw = {"train_per_class": 630, "test_per_class": 70, "mode": "symlink"}
    t = time.perf_counter()
    a = prepare(REAL, tmp_path / "a", **kw)
    elapsed = time.perf_counter() - t
    assert a.counts == {c: {"train": 630, "test": 70} for c in ("airplane", "airport")}
    assert a.skipped == [] and a.unused == {"airplane": 0, "airport": 0}
    parts = _parts(tmp_path / "a")
    assert len(parts["train"]) == 1260 and len(parts["test"]) == 140
    _no_overlap(parts)
    b = prepare(REAL, tmp_path / "b", **kw)
    assert a.manifest_path.read_bytes() == b.manifest_path.read_bytes()
    prepare(REAL, tmp_path / "c", seed=1, **kw)
    assert _parts(tmp_path / "c")["test"] != parts["test"]
    assert elapsed < 30, f"checking 1,400 JPEGs took {elapsed:.1f} s"


def test_a_split_file_saved_with_a_byte_order_mark_is_read(raw, tmp_path):
    listing = tmp_path / "bom.txt"
    text = "train bridge/bridge_000.jpg\ntest bridge/bridge_005.jpg\n"
    listing.write_text(text, encoding="utf-8-sig")  # as Windows' Notepad saves UTF-8
    prepare(raw, tmp_path / "a", split_file=listing)
    assert _parts(tmp_path / "a") == {
        "train": {("bridge", "bridge_000.jpg")},
        "test": {("bridge", "bridge_005.jpg")},
    }
