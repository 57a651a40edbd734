"""``rsscene prepare``: turn a raw one-folder-per-class dataset into a train/val/test split.

The raw layout is the one NWPU-RESISC45, AID, UC Merced and RSSCN7 ship in::

    SRC/CLASS/image.jpg

and the result is::

    DST/train/CLASS/image.jpg
    DST/val/CLASS/image.jpg      (only with a validation part)
    DST/test/CLASS/image.jpg
    DST/split.json               (the manifest, written last)

Every candidate file is decoded with :func:`rsscene.data.images.read_image` *before* the split
(every band of a TIFF, 8-bit RGB for other formats),
so a file that cannot be read never takes a slot; it is left out and listed with its reason.

The split is stratified and deterministic: within a class, files are ordered by
``sha256(f"{seed}:{class}:{name}")`` (a keyed shuffle that depends neither on directory order
nor on Python's hash randomisation) and assigned first to test, then val, then train. Because
each file's place depends only on its own name, adding a validation part leaves the test part
unchanged, and adding or removing a file (a corrupt one fixed, say) moves no other file.

A training ratio (``train_ratio``, the remote-sensing protocol: that share of each class
trains, the rest tests) plans the counts the same way. A split file (``split_file``) instead
reproduces a published split list: every line names a part and a file.

Each of these modes is one :class:`SplitPlan`, built once from prepare's options: it refuses
a combination that makes no sense, decides each file's part, and says how ``split.json``
records it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rsscene.data.images import ImageError, is_image_file, read_image
from rsscene.errors import UserError

MANIFEST_NAME = "split.json"
MANIFEST_VERSION = 1
PARTIAL_NAME = ".rsscene-prepare.partial.json"  # the plan, written before any file is placed
PARTS = ("train", "val", "test")
MODES = ("copy", "hardlink", "symlink")
NOT_AN_IMAGE_EXTENSION = "not an image extension"
# Entries that are never classes or images: hidden files, macOS zip debris, Windows thumbnails.
_JUNK_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Skipped:
    """A file left out of the split; ``file`` is relative to SRC (``CLASS/name``)."""

    file: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


@dataclass(frozen=True)
class Duplicate:
    """Byte-identical files placed in the split; ``leakage`` when they span parts."""

    sha256: str
    files: tuple[str, ...]  # relative to DST: ``part/CLASS/name``

    @property
    def leakage(self) -> bool:
        return len({f.split("/", 1)[0] for f in self.files}) > 1

    @property
    def kind(self) -> str:
        return "leakage" if self.leakage else "within part"

    def as_dict(self) -> dict[str, object]:
        return {"sha256": self.sha256, "kind": self.kind, "files": list(self.files)}


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote: per-class counts, files left out, duplicates, manifest."""

    src: Path
    dst: Path
    manifest_path: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # class -> {"train": n, "val": n, "test": n}
    skipped: list[Skipped]
    duplicates: list[Duplicate]
    unused: dict[str, int] = field(default_factory=dict)  # good images beyond the asked counts
    mode: str = "copy"
    seed: int = 0

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts written: ``("train", "test")`` or ``("train", "val", "test")``."""
        has_val = any(c.get("val", 0) for c in self.counts.values())
        return PARTS if has_val else ("train", "test")

    @property
    def leakage(self) -> list[Duplicate]:
        return [d for d in self.duplicates if d.leakage]

    def total(self, part: str) -> int:
        return sum(c.get(part, 0) for c in self.counts.values())


@dataclass(frozen=True)
class _Candidate:
    cls: str
    name: str
    path: Path  # under the resolved SRC

    @property
    def rel(self) -> str:
        return f"{self.cls}/{self.name}"


@dataclass(frozen=True)
class _Checked:
    cand: _Candidate
    size: int
    sha256: str
    reason: str | None  # None: a good image


# --------------------------------------------------------------------------- helpers
def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _resolve_src(src: str | Path) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        raise UserError(f"source folder {src} does not exist")
    if not path.is_dir():
        raise UserError(f"source {src} is not a folder (expected one folder per class)")
    path = path.resolve()
    manifest = path / MANIFEST_NAME
    if manifest.is_file() and _read_own_manifest(manifest) is not None:
        raise UserError(
            f"source {src} is already a split written by rsscene prepare; give the raw "
            "one-folder-per-class dataset instead"
        )
    return path


def _class_folders(src: Path) -> list[str]:
    try:
        entries = sorted(e.name for e in os.scandir(src) if not _is_hidden(e.name) and e.is_dir())
    except OSError as e:
        raise UserError(f"cannot read source folder {src}: {e.strerror or e}") from None
    if not entries:
        n_images = sum(1 for e in os.scandir(src) if e.is_file() and is_image_file(e.name))
        hint = f" ({n_images} images lie directly in it)" if n_images else ""
        raise UserError(
            f"source folder {src} has no class folders{hint}; expected SRC/CLASS/image files"
        )
    return entries


def _select_classes(available: list[str], wanted: Sequence[str] | None) -> list[str]:
    """Folder names for ``wanted`` (exact match first, then case-insensitive), sorted like
    ``available`` so class order (and label indices) never depend on how --classes was written.
    """
    if wanted is None:
        return list(available)
    wanted = [w.strip() for w in wanted if w.strip()]
    if not wanted:
        raise UserError("--classes is empty")
    chosen: list[str] = []
    unknown: list[str] = []
    for name in wanted:
        if name in available:
            match = name
        else:
            folded = [a for a in available if a.casefold() == name.casefold()]
            if len(folded) > 1:
                raise UserError(
                    f"class {name!r} matches several folders that differ only in case: "
                    f"{', '.join(folded)}; give the exact name"
                )
            if not folded:
                unknown.append(name)
                continue
            match = folded[0]
        if match in chosen:
            raise UserError(f"class {match!r} is listed twice in --classes")
        chosen.append(match)
    if unknown:
        raise UserError(
            f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"available: {', '.join(available)}"
        )
    return sorted(chosen)


def _list_class(src: Path, cls: str) -> tuple[list[_Candidate], list[Skipped]]:
    folder = src / cls
    try:
        entries = sorted(
            (e for e in os.scandir(folder) if not _is_hidden(e.name)), key=lambda e: e.name
        )
    except OSError as e:
        raise UserError(f"cannot read class folder {folder}: {e.strerror or e}") from None
    if not entries:
        raise UserError(f"class folder {cls} is empty ({folder})")
    candidates: list[_Candidate] = []
    skipped: list[Skipped] = []
    for e in entries:
        rel = f"{cls}/{e.name}"
        if e.is_dir():
            skipped.append(Skipped(rel, "a folder (class folders are not searched recursively)"))
        elif not is_image_file(e.name):
            skipped.append(Skipped(rel, NOT_AN_IMAGE_EXTENSION))
        else:
            candidates.append(_Candidate(cls, e.name, folder / e.name))
    if not candidates:
        raise UserError(
            f"class folder {cls} has no image files ({len(skipped)} other entries; images end "
            "in .jpg, .jpeg, .png, .tif, .tiff, .bmp, .webp or .gif)"
        )
    return candidates, skipped


def _check_one(cand: _Candidate) -> _Checked:
    try:
        data = cand.path.read_bytes()
    except OSError as e:
        return _Checked(cand, 0, "", f"cannot read ({e.strerror or type(e).__name__})")
    digest = hashlib.sha256(data).hexdigest()
    try:
        read_image(data, name=cand.rel)
    except ImageError as e:
        return _Checked(cand, len(data), digest, e.reason)
    return _Checked(cand, len(data), digest, None)


def _check_all(
    candidates: list[_Candidate], workers: int | None, progress: bool | None
) -> list[_Checked]:
    """Decode every candidate (in threads: Pillow decodes without the GIL); keeps input order."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if progress is None:
        progress = sys.stderr.isatty()

    def wrap(results: Iterable[_Checked]) -> Iterable[_Checked]:
        if not progress:
            return results
        from tqdm import tqdm

        return tqdm(results, total=len(candidates), desc="checking images", unit="img")

    if workers <= 1 or len(candidates) < 16:
        return list(wrap(map(_check_one, candidates)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(wrap(pool.map(_check_one, candidates)))


def _order_key(seed: int, cls: str, name: str) -> tuple[str, str]:
    text = f"{seed}:{cls}:{name}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(text).hexdigest(), name


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


# --------------------------------------------------------------------------- DST handling
def _read_own_manifest(path: Path) -> dict | None:
    """The manifest at ``path`` if rsscene wrote it, else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and "rsscene_split" in data and isinstance(data.get("files"), list):
        return data
    return None


def _owned_files(dst: Path) -> set[str]:
    """Paths under DST (``part/CLASS/name``) that an earlier run of prepare wrote or planned."""
    owned: set[str] = set()
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        path = dst / name
        if not path.exists():
            continue
        data = _read_own_manifest(path)
        if data is None:
            raise UserError(
                f"{path} was not written by rsscene prepare; refusing to replace it (remove it "
                "yourself or choose another destination)"
            )
        for f in data["files"]:
            rel = str(f.get("file")) if isinstance(f, dict) else ""
            # --force deletes these paths: an edited manifest must not reach outside DST.
            names = rel.split("/")
            if len(names) != 3 or names[0] not in PARTS or {"", ".", ".."} & set(names):
                raise UserError(
                    f"{path} lists {rel!r}, which is not a part/CLASS/file path inside "
                    f"{dst}; refusing to delete anything (remove the old split yourself)"
                )
            owned.add(rel)
    return owned


def _check_dst(dst: Path, force: bool) -> set[str] | None:
    """Refuse a DST we must not write into; with ``force``, return what to remove first."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"destination {dst} exists and is not a folder")
    if not dst.exists():
        return None
    entries = [e for e in os.listdir(dst) if e != ".DS_Store"]
    if not entries:
        return None
    if not force:
        raise UserError(
            f"destination {dst} is not empty; use --force to replace a split rsscene prepare "
            "wrote there, or choose another destination"
        )
    owned = _owned_files(dst)
    strangers: list[str] = []
    for part in PARTS:
        top = dst / part
        if not os.path.lexists(top):
            continue
        if top.is_symlink() or not top.is_dir():
            strangers.append(part)
            continue
        for root, dirs, files in os.walk(top):
            rel_root = Path(root).relative_to(dst).as_posix()
            for d in dirs:
                if os.path.islink(os.path.join(root, d)):
                    strangers.append(f"{rel_root}/{d}")
            for f in files:
                rel = f"{rel_root}/{f}"
                if rel not in owned and f != ".DS_Store":
                    strangers.append(rel)
    if strangers:
        raise UserError(
            f"destination {dst} holds {len(strangers)} file(s) in train/val/test that rsscene "
            f"prepare did not write (e.g. {strangers[0]}); --force only replaces its own split, "
            "so remove them yourself or choose another destination"
        )
    return owned


def _remove_old_split(dst: Path, owned: set[str]) -> None:
    for rel in sorted(owned):
        path = dst / rel
        if rel.split("/", 1)[0] in PARTS and (path.is_symlink() or path.is_file()):
            path.unlink()
    for part in PARTS:
        top = dst / part
        if not top.is_dir() or top.is_symlink():
            continue
        for root, _dirs, files in os.walk(top, topdown=False):
            for f in files:
                if f == ".DS_Store":
                    os.unlink(os.path.join(root, f))
            os.rmdir(root)  # empty now: _check_dst found nothing else in here
    for name in (MANIFEST_NAME, PARTIAL_NAME):
        if (dst / name).exists():
            (dst / name).unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _place(source: Path, target: Path, mode: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if mode == "copy":
            shutil.copy2(source, target)
        elif mode == "symlink":
            os.symlink(source, target)
        else:
            os.link(source, target)
    except OSError as e:
        if mode == "hardlink" and e.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise UserError(
                f"cannot hardlink {source} to {target} ({e.strerror}); SRC and DST must be on "
                "the same filesystem that supports hard links: use --mode copy or --mode symlink"
            ) from None
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None


def _find_duplicates(files: list[dict]) -> list[Duplicate]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_hash[f["sha256"]].append(f["file"])
    dups = [Duplicate(h, tuple(sorted(fs))) for h, fs in by_hash.items() if len(fs) > 1]
    return sorted(dups, key=lambda d: (not d.leakage, d.files))


# --------------------------------------------------------------------------- split files
_SPLIT_LINE = re.compile(r"^\s*(\S+?)\s*[,\s]\s*(\S.*?)\s*$")
_PART_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_split_file(path: str | Path) -> list[tuple[str, str]]:
    """The (part, file) pairs of a split list: an rsscene ``split.json``, or text with one
    ``PART FILE`` per line (a space or a comma between them; ``#`` starts a comment). FILE is
    ``CLASS/name`` under SRC or a bare name found in one class folder."""
    path = Path(path)
    try:
        # utf-8-sig: lists saved by Windows editors start with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--split-file {path}: cannot read ({getattr(e, 'strerror', e)})") from None
    if path.suffix.lower() == ".json":
        data = _read_own_manifest(path)
        if data is None:
            raise UserError(f"--split-file {path}: not a split.json written by rsscene prepare")
        return [(str(f.get("part")), str(f.get("source"))) for f in data["files"]]
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0]
        if not line.strip():
            continue
        match = _SPLIT_LINE.match(line)
        part = _PART_NAMES.get(match.group(1).lower()) if match else None
        if part is None:
            raise UserError(
                f"--split-file {path}:{number}: expected 'PART FILE' with PART train, val or"
                f" test, got {line.strip()!r}"
            )
        pairs.append((part, match.group(2)))
    if not pairs:
        raise UserError(f"--split-file {path}: lists no files")
    return pairs


def _resolve_listed(
    pairs: list[tuple[str, str]], candidates: list[_Candidate], path: str | Path
) -> dict[str, str]:
    """``CLASS/name`` -> part for every listed file; a file not among ``candidates`` (the image
    files of the chosen classes), or listed twice, is refused."""
    by_rel = {c.rel: c for c in candidates}
    by_name: dict[str, list[str]] = defaultdict(list)
    for c in candidates:
        by_name[c.name].append(c.rel)
    listed: dict[str, str] = {}
    missing, ambiguous, twice = [], [], []
    for part, file in pairs:
        rel = file.replace("\\", "/").strip("/")
        if rel not in by_rel:
            found = by_name.get(rel.rsplit("/", 1)[-1], []) if "/" not in rel else []
            if len(found) > 1:
                ambiguous.append(rel)
                continue
            if not found:
                missing.append(file)
                continue
            rel = found[0]
        if rel in listed:
            twice.append(rel)
        listed[rel] = part
    for problem, names in (
        ("are not image files of the chosen class folders", missing),
        ("are bare names found in several class folders (write CLASS/name)", ambiguous),
        ("are listed twice", twice),
    ):
        if names:
            raise UserError(
                f"--split-file {path}: {len(names)} listed file(s) {problem}, e.g. {names[0]}"
            )
    return listed


# --------------------------------------------------------------------------- the split plan
@dataclass(frozen=True)
class _Listing:
    """The chosen classes, their image files, and the entries of their folders left out."""

    classes: list[str]
    candidates: list[_Candidate]
    skipped: list[Skipped]


_Placed = dict[str, list[tuple[str, _Checked]]]  # class -> its (part, file) pairs
_OPTION_NAMES = (
    "train_per_class",
    "val_per_class",
    "test_per_class",
    "test_ratio",
    "val_ratio",
    "train_ratio",
)


def _options(**given: object) -> dict[str, object]:
    # split.json names every option, so a reader never has to know which ones a mode takes
    return {**dict.fromkeys(_OPTION_NAMES), **given}


class SplitPlan(ABC):
    """One way to split, built once from :func:`prepare`'s options by :meth:`from_options`:
    exact counts (:class:`PerClassCounts`), a test or training ratio (:class:`RatioSplit`), or
    a published split list (:class:`ListedSplit`)."""

    @staticmethod
    def from_options(
        *,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        val_per_class: int | None = None,
        test_ratio: float | None = None,
        val_ratio: float = 0.0,
        train_ratio: float | None = None,
        split_file: str | Path | None = None,
    ) -> SplitPlan:
        """The plan the options ask for (a test ratio of 0.1 when they name no mode); a
        combination that makes no sense raises :class:`UserError`."""
        if train_per_class is not None and test_ratio is not None:
            raise UserError(
                "--test-ratio cannot be combined with --train-per-class/--test-per-class"
            )
        counts = (train_per_class, test_per_class, val_per_class)
        if split_file is not None:
            if any(v is not None for v in (*counts, train_ratio, test_ratio)) or val_ratio:
                raise UserError("--split-file sets every part: it takes no counts or ratios")
            return ListedSplit(split_file)
        if train_ratio is not None:
            if any(v is not None for v in counts) or test_ratio is not None:
                raise UserError(
                    "--train-ratio cannot be combined with --test-ratio or per-class counts"
                    " (the images it leaves out of train and val are the test part)"
                )
            return RatioSplit("train", train_ratio, val_ratio)
        if train_per_class is None or test_per_class is None:
            if train_per_class is not None or test_per_class is not None:
                raise UserError("--train-per-class and --test-per-class must be given together")
            if val_per_class is not None:
                raise UserError("--val-per-class needs --train-per-class and --test-per-class")
            return RatioSplit("test", 0.1 if test_ratio is None else test_ratio, val_ratio)
        plan = PerClassCounts(train_per_class, test_per_class, val_per_class)
        if val_ratio:
            raise UserError("--val-ratio cannot be combined with exact counts; use --val-per-class")
        return plan

    def select(self, listing: _Listing) -> tuple[SplitPlan, _Listing]:
        """The plan bound to the files it splits, and those files (here: all of ``listing``)."""
        return self, listing

    @abstractmethod
    def place(self, good: dict[str, list[_Checked]], seed: int) -> tuple[_Placed, dict[str, int]]:
        """Each class's (part, file) pairs, and how many of its good files are left unused."""

    @abstractmethod
    def options(self) -> dict[str, object]:
        """How split.json records this plan (its ``options``)."""


class _CountedSplit(SplitPlan):
    """A plan that gives every class a number of images per part, taken in the keyed order."""

    @abstractmethod
    def counts(self, n: int) -> dict[str, int]:
        """How many train, val and test images a class of ``n`` good images gets."""

    @abstractmethod
    def shortfall(self, n: int) -> str | None:
        """Why ``n`` good images cannot fill :meth:`counts`, or None when they can."""

    def place(self, good: dict[str, list[_Checked]], seed: int) -> tuple[_Placed, dict[str, int]]:
        short = [
            f"{cls} has {len(files)} good images, {why}"
            for cls, files in good.items()
            if (why := self.shortfall(len(files)))
        ]
        if short:
            raise UserError("not enough images: " + "; ".join(short))
        placed: _Placed = {}
        unused: dict[str, int] = {}
        for cls, checked in good.items():
            ordered = sorted(checked, key=lambda c: _order_key(seed, cls, c.cand.name))
            want = self.counts(len(ordered))
            placed[cls], start = [], 0
            for part in ("test", "val", "train"):  # test first, so adding val never changes test
                placed[cls] += [(part, c) for c in ordered[start : start + want[part]]]
                start += want[part]
            unused[cls] = len(ordered) - start
        return placed, unused


@dataclass(frozen=True)
class PerClassCounts(_CountedSplit):
    """Exactly ``train``, ``test`` and ``val`` images from every class; the rest stay unused."""

    train: int
    test: int
    val: int | None = None  # None (not asked) splits like 0, but split.json records which

    def __post_init__(self) -> None:
        for flag, value in (("--train-per-class", self.train), ("--test-per-class", self.test)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1, got {value}")
        if self.val is not None and self.val < 0:
            raise UserError(f"--val-per-class must be at least 0, got {self.val}")

    def counts(self, n: int) -> dict[str, int]:
        return {"train": self.train, "val": self.val or 0, "test": self.test}

    def shortfall(self, n: int) -> str | None:
        want = self.counts(n)
        need = sum(want.values())
        if n >= need:
            return None
        asked = " + ".join(f"{want[p]} {p}" for p in PARTS if want[p])
        return f"{need} requested ({asked})"

    def options(self) -> dict[str, object]:
        return _options(
            train_per_class=self.train, val_per_class=self.val, test_per_class=self.test
        )


@dataclass(frozen=True)
class RatioSplit(_CountedSplit):
    """``ratio`` of every class goes to ``part`` ("test", or "train" for the remote-sensing
    training ratio), ``val_ratio`` to val, the rest to the other part; each share is ``n *
    ratio`` rounded half up, at least 1."""

    part: Literal["test", "train"]
    ratio: float
    val_ratio: float = 0.0

    @property
    def rest(self) -> str:
        """The part that takes what the ratios leave."""
        return "train" if self.part == "test" else "test"

    def __post_init__(self) -> None:
        flag = f"--{self.part}-ratio"
        if not 0 < self.ratio < 1:
            raise UserError(f"{flag} must be between 0 and 1, got {self.ratio}")
        # --test-ratio names a bad --val-ratio on its own; --train-ratio has always folded it
        # into the room check, and its message stays as it was.
        if self.part == "test" and not 0 <= self.val_ratio < 1:
            raise UserError(f"--val-ratio must be between 0 and 1, got {self.val_ratio}")
        if not 0 <= self.val_ratio < 1 or self.ratio + self.val_ratio >= 1:
            room = "training" if self.rest == "train" else "testing"
            raise UserError(
                f"{flag} + --val-ratio must leave room for {room}, got {self.ratio} + "
                f"{self.val_ratio}"
            )

    def counts(self, n: int) -> dict[str, int]:
        share = max(1, _round_half_up(n * self.ratio))
        val = max(1, _round_half_up(n * self.val_ratio)) if self.val_ratio > 0 else 0
        return {self.part: share, "val": val, self.rest: n - share - val}

    def shortfall(self, n: int) -> str | None:
        want = self.counts(n)
        if want[self.rest] >= 1:
            return None
        val = f" + {want['val']} val" if want["val"] else ""
        return f"too few for {want[self.part]} {self.part}{val} + at least 1 {self.rest}"

    def options(self) -> dict[str, object]:
        return _options(**{f"{self.part}_ratio": self.ratio}, val_ratio=self.val_ratio)


@dataclass(frozen=True)
class ListedSplit(SplitPlan):
    """The split a list gives (see :func:`read_split_file`): each listed file's part; files it
    does not list are left out, unchecked and unreported."""

    path: str | Path
    # CLASS/name -> part, bound by select: a bare name in the list needs the class folders
    part_of: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def select(self, listing: _Listing) -> tuple[SplitPlan, _Listing]:
        """Only the listed files, their classes, and each file's part; a list that leaves
        train or test empty is refused."""
        listed = _resolve_listed(read_split_file(self.path), listing.candidates, self.path)
        missing = {"train", "test"} - set(listed.values())
        if missing:
            raise UserError(f"--split-file {self.path}: lists no {min(missing)} files")
        classes = [c for c in listing.classes if any(rel.startswith(f"{c}/") for rel in listed)]
        candidates = [c for c in listing.candidates if c.rel in listed]
        return replace(self, part_of=listed), _Listing(classes, candidates, [])

    def place(self, good: dict[str, list[_Checked]], seed: int) -> tuple[_Placed, dict[str, int]]:
        placed = {
            cls: [(self.part_of[c.cand.rel], c) for c in files] for cls, files in good.items()
        }
        return placed, dict.fromkeys(good, 0)

    def options(self) -> dict[str, object]:
        """Besides the (unused) counts and ratios: the list's absolute path and SHA-256."""
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        return _options(split_file=str(Path(self.path).resolve()), split_file_sha256=digest)


# --------------------------------------------------------------------------- the library call
def _listing(src: Path, classes: Sequence[str] | None) -> _Listing:
    """The chosen class folders, their image files, and their other entries."""
    chosen = _select_classes(_class_folders(src), classes)
    candidates: list[_Candidate] = []
    skipped: list[Skipped] = []
    for cls in chosen:
        cands, skips = _list_class(src, cls)
        candidates += cands
        skipped += skips
    return _Listing(chosen, candidates, skipped)


def _good_files(
    listing: _Listing, workers: int | None, progress: bool | None, strict: bool
) -> tuple[dict[str, list[_Checked]], list[Skipped]]:
    """Each class's good images, and every entry left out (bad images with their reason)."""
    checked = _check_all(listing.candidates, workers, progress)
    bad = [Skipped(c.cand.rel, c.reason) for c in checked if c.reason is not None]
    if strict and bad:
        raise UserError(
            f"{len(bad)} bad image(s) (--strict): "
            + "; ".join(f"{b.file}: {b.reason}" for b in bad)
        )
    good: dict[str, list[_Checked]] = {cls: [] for cls in listing.classes}
    for c in checked:
        if c.reason is None:
            good[c.cand.cls].append(c)
    return good, sorted(listing.skipped + bad, key=lambda s: s.file)


def _file_entry(part: str, c: _Checked) -> dict:
    return {
        "file": f"{part}/{c.cand.cls}/{c.cand.name}",
        "source": c.cand.rel,
        "class": c.cand.cls,
        "part": part,
        "size": c.size,
        "sha256": c.sha256,
    }


def _file_entries(placed: _Placed) -> list[dict]:
    """The manifest's file list, ordered by part, class and path."""
    return sorted(
        (_file_entry(part, c) for pairs in placed.values() for part, c in pairs),
        key=lambda f: (f["part"], f["class"], f["file"]),
    )


def _tally(placed: _Placed) -> dict[str, dict[str, int]]:
    """Per-class counts per part; a val count only where some class has val images."""
    tally = {
        cls: {p: sum(1 for q, _ in pairs if q == p) for p in PARTS} for cls, pairs in placed.items()
    }
    has_val = any(t["val"] for t in tally.values())
    return {cls: {p: n for p, n in t.items() if p != "val" or has_val} for cls, t in tally.items()}


def _manifest(result: PrepareResult, options: dict[str, object], files: list[dict]) -> dict:
    """The split.json of ``result``, whose placed files ``files`` lists."""
    return {
        "rsscene_split": MANIFEST_VERSION,
        "source": str(result.src),
        "seed": result.seed,
        "mode": result.mode,
        "options": options,
        "classes": result.classes,
        "counts": result.counts,
        "files": files,
        "skipped": [s.as_dict() for s in result.skipped],
        "duplicates": [d.as_dict() for d in result.duplicates],
    }


def _locations(src: str | Path, dst: str | Path) -> tuple[Path, Path]:
    """The resolved source and destination, refused where one lies inside what the other
    holds (prepare would read its own output or write into its input)."""
    src_path = _resolve_src(src)
    dst_path = Path(dst).expanduser().resolve()
    if _inside(dst_path, src_path):
        raise UserError(f"destination {dst} lies inside the source folder {src}")
    for part in PARTS:
        if _inside(src_path, dst_path / part):
            raise UserError(f"source {src} lies inside {dst_path / part}, which prepare writes")
    return src_path, dst_path


def prepare(
    src: str | Path,
    dst: str | Path,
    *,
    classes: Sequence[str] | None = None,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    val_per_class: int | None = None,
    test_ratio: float | None = None,
    val_ratio: float = 0.0,
    train_ratio: float | None = None,
    split_file: str | Path | None = None,
    seed: int = 0,
    mode: str = "copy",
    force: bool = False,
    strict: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
) -> PrepareResult:
    """Split ``src`` (one folder per class) into ``dst/train``, ``dst/val``, ``dst/test``.

    One of: exact counts (``train_per_class`` and ``test_per_class`` together, optionally
    ``val_per_class``); ratios of the test part (``test_ratio``, default 0.1 when nothing else
    is given) or of the training part (``train_ratio``: the rest tests), each with
    ``val_ratio`` (a per-class count is ``n * ratio`` rounded half up, at least 1); or a
    ``split_file`` listing the part of every file (see :func:`read_split_file`; files it does
    not list are left unused). See :class:`SplitPlan`. Every image is decoded first; bad files
    are left out and listed in the result (``strict``: raise :class:`UserError` instead).
    Files are placed by ``mode`` (copy, hardlink or symlink with absolute targets), then the
    manifest ``dst/split.json`` is written last, atomically. Nothing is printed; see
    :func:`format_report`. ``progress=None`` shows a bar only when stderr is a terminal.
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    plan = SplitPlan.from_options(
        train_per_class=train_per_class, test_per_class=test_per_class,
        val_per_class=val_per_class, test_ratio=test_ratio, val_ratio=val_ratio,
        train_ratio=train_ratio, split_file=split_file,
    )  # fmt: skip
    src_path, dst_path = _locations(src, dst)
    to_remove = _check_dst(dst_path, force)
    plan, listing = plan.select(_listing(src_path, classes))
    good, skipped = _good_files(listing, workers, progress, strict)
    placed, unused = plan.place(good, seed)
    files = _file_entries(placed)
    result = PrepareResult(
        src=src_path, dst=dst_path, manifest_path=dst_path / MANIFEST_NAME,
        classes=listing.classes, counts=_tally(placed), skipped=skipped,
        duplicates=_find_duplicates(files), unused=unused, mode=mode, seed=seed,
    )  # fmt: skip
    manifest = _manifest(result, plan.options(), files)
    _write_split(src_path, dst_path, manifest, mode, to_remove, (src, dst))
    return result


def _write_split(
    src_path: Path,
    dst_path: Path,
    manifest: dict,
    mode: str,
    to_remove: set[str] | None,
    given: tuple[str | Path, str | Path],
) -> None:
    """Everything is checked; only now touch DST: place the files, then the manifest."""
    src, dst = given
    if mode == "hardlink":
        probe = dst_path if dst_path.exists() else next(p for p in dst_path.parents if p.exists())
        if os.stat(probe).st_dev != os.stat(src_path).st_dev:
            raise UserError(
                f"cannot hardlink: source {src} and destination {dst} are on different "
                "filesystems; use --mode copy or --mode symlink"
            )
    try:
        dst_path.mkdir(parents=True, exist_ok=True)
        if to_remove is not None:
            _remove_old_split(dst_path, to_remove)
        _write_json(dst_path / PARTIAL_NAME, manifest)
    except OSError as e:
        raise UserError(f"cannot write to destination {dst}: {e.strerror or e}") from None
    for f in manifest["files"]:
        _place(src_path / f["source"], dst_path / f["file"], mode)
    manifest_path = dst_path / MANIFEST_NAME
    try:
        _write_json(manifest_path, manifest)
        (dst_path / PARTIAL_NAME).unlink()
    except OSError as e:
        raise UserError(f"cannot write {manifest_path}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- the report
def format_report(result: PrepareResult, *, max_listed: int = 20) -> str:
    """A per-class table of counts, the files left out and why, duplicates, and where it went."""
    parts = result.parts
    skipped_by_class: dict[str, int] = defaultdict(int)
    for s in result.skipped:
        skipped_by_class[s.file.split("/", 1)[0]] += 1
    show_unused = any(result.unused.values())
    header = ["class", *parts, "skipped"] + (["unused"] if show_unused else [])
    rows = []
    for cls in result.classes:
        row = [cls, *(str(result.counts[cls].get(p, 0)) for p in parts)]
        row.append(str(skipped_by_class.get(cls, 0)))
        if show_unused:
            row.append(str(result.unused.get(cls, 0)))
        rows.append(row)
    total = ["total", *(str(result.total(p)) for p in parts), str(len(result.skipped))]
    if show_unused:
        total.append(str(sum(result.unused.values())))
    widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out += ["  ".join("-" * w for w in widths), line(total)]

    if result.skipped:
        out.append("")
        out.append(f"left out {len(result.skipped)} file(s):")
        for s in result.skipped[:max_listed]:
            out.append(f"  {s.file}: {s.reason}")
        if len(result.skipped) > max_listed:
            out.append(
                f"  ... and {len(result.skipped) - max_listed} more (see {result.manifest_path})"
            )
    leaks = result.leakage
    if leaks:
        out.append("")
        out.append(
            f"warning: {len(leaks)} set(s) of identical files span parts (train/test leakage):"
        )
        for d in leaks[:max_listed]:
            out.append("  " + " = ".join(d.files))
        if len(leaks) > max_listed:
            out.append(f"  ... and {len(leaks) - max_listed} more (see {result.manifest_path})")
    same = [d for d in result.duplicates if not d.leakage]
    if same:
        out.append("")
        out.append(f"note: {len(same)} set(s) of identical files within one part")
    out.append("")
    out.append(
        f"split written to {result.dst} ({result.mode}, seed {result.seed}); "
        f"manifest {result.manifest_path}"
    )
    return "\n".join(out)
