"""The output folder of a map: one complete map or none, never mixed with other files, never
written over its own scene.

:func:`check_target` decides, before any window is predicted, whether a folder may take a
map: a new or empty folder, or an earlier map of the same scene file and settings (recognised
by ``summary.json``'s record), or with ``force`` any earlier map. :func:`staged` then gives a
fresh folder for the files, beside the output folder, and renames it into place whole when
they are all written; an error or Ctrl-C removes it, and the earlier folder stays as it was.
A folder that holds the scene itself (and nothing else but an earlier map), or is the
working directory, stays: the files are written in a folder inside it and moved in, the
earlier map's removed first and ``summary.json`` moved last.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsscene.errors import UserError

# Every name map writes; a folder holding these and nothing else is a map.
MAP_FILES = frozenset(
    {
        "classes.tif",
        "classes.png",
        "probabilities.tif",
        "overlay.png",
        "tiles.csv",
        "tiles.geojson",
        "summary.json",
    }
)
# summary.json's key for the scene file and settings a map was made from.
RECORD = "rsscene_map"
# The folder a map is written into before it is renamed into place (inside the output folder
# for a map beside its scene: a crash may leave one there, and the next map removes it).
STAGE = ".rsscene-tmp-"
MAX_SUMMARY_BYTES = 50_000_000


@dataclass(frozen=True)
class Target:
    """Where a map goes: ``out`` as given, ``path`` resolved; ``in_place`` when the folder
    must stay where it is (it holds the scene, or is the working directory) and the map's
    files are moved into it."""

    out: Path
    path: Path
    scene: Path
    record: dict[str, Any]
    force: bool = False

    @property
    def in_place(self) -> bool:
        # Renaming the working directory away would leave the user's shell in a deleted one.
        return self.path.is_dir() and (
            _same(self.scene.parent, self.path) or _same(Path.cwd(), self.path)
        )


def scene_record(scene: str | Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What recognises a map as made from this scene file (path, size, modification time) with
    these settings: summary.json keeps it under :data:`RECORD`."""
    path = Path(scene).resolve()
    stat = path.stat()
    file = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"scene": file, "settings": settings}


def _same(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_target(out: str | Path, scene: str | Path, record: dict[str, Any], force: bool) -> Target:
    """The folder ``out`` as a :class:`Target` for a map of ``scene``, or a one-line
    :class:`UserError` saying why not and what to do."""
    out = Path(out)
    target = Target(out, out.resolve(), Path(scene).resolve(), record, force)
    path = target.path
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    for name in sorted(MAP_FILES):
        if _same(path / name, target.scene):
            raise UserError(
                f"--out {out}: map would write its {name} there, and {out / name} is the scene"
                " itself; choose another --out"
            )
    _check_writable(target)
    if path.is_dir():
        entries = [e for e in os.scandir(path) if not _same(e.path, target.scene)]
        _check_contents(target, entries)
    return target


def _check_writable(target: Target) -> None:
    """Refuse now, not after the windows are predicted, a folder the map cannot be put in."""
    path, out = target.path, target.out
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: permission denied (the folder is not writable)")
    if target.in_place:
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: permission denied (cannot write in {parent})")


def _check_contents(target: Target, entries: list[os.DirEntry]) -> None:
    """A non-empty folder takes the map only when it is an earlier map of the same scene and
    settings, or of any with ``force``; anything else in it is never mixed in nor deleted."""
    # An unfinished map's folder (a crash's, or this map's own) is removed with the map.
    entries = [
        e for e in entries if not (e.name.startswith(STAGE) and e.is_dir(follow_symlinks=False))
    ]
    if not entries:
        return
    out = target.out
    foreign = sorted(
        e.name + ("/" if e.is_dir() else "")
        for e in entries
        if not (e.name in MAP_FILES and e.is_file(follow_symlinks=False))
    )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(
            f"--out {out}: not empty and not an rsscene map (it holds {', '.join(foreign[:3])}"
            f"{more}); choose a new or empty folder, so that nothing is mixed or lost"
        )
    if target.force:
        return
    summary = read_summary(target.path / "summary.json")
    if summary is None:
        raise UserError(
            f"--out {out}: holds an incomplete map (no summary.json); --force replaces it"
        )
    if summary.get(RECORD) != target.record:
        raise UserError(
            f"--out {out}: holds {_earlier(summary.get(RECORD), target)}; --force replaces it"
        )


def read_summary(path: Path) -> dict[str, Any] | None:
    """A map's summary.json, or None when there is none or it is not one."""
    try:
        if path.stat().st_size > MAX_SUMMARY_BYTES:
            return None
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not {"scene", "per_class"} <= summary.keys():
        return None
    return summary


def _earlier(record: Any, target: Target) -> str:
    """What the earlier map in a folder is, against the one asked for."""
    if not isinstance(record, dict) or not isinstance(record.get("scene"), dict):
        return "an earlier map without a record of its scene file and settings"
    scene, now = record["scene"], target.record["scene"]
    if scene.get("path") != now["path"]:
        return f"a map of another scene ({scene.get('path')})"
    if scene != now:
        return f"a map of {now['path']} made before the file changed"
    settings, wanted = record.get("settings") or {}, target.record["settings"]
    changed = [f"{k} {settings.get(k)} -> {v}" for k, v in wanted.items() if settings.get(k) != v]
    return f"a map of the same scene with other settings ({', '.join(changed) or 'unknown'})"


def _new_folder(where: Path, prefix: str) -> Path:
    """A new empty folder ``where/prefix<random>``, made with the user's umask."""
    while True:
        path = where / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _make_parents(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the ones created, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    return missing[::-1]


@contextlib.contextmanager
def staged(target: Target) -> Iterator[Path]:
    """A fresh folder to write the map's files in; when the block ends without error the map
    is put in place whole (after the folder is checked again: it may have changed while the
    windows were predicted), and otherwise removed with the parents it created."""
    created = [] if target.in_place else _make_parents(target.path.parent)
    where = target.path if target.in_place else target.path.parent
    stage = _new_folder(where, STAGE if target.in_place else f".{target.path.name}{STAGE}")
    try:
        yield stage
        target = check_target(target.out, target.scene, target.record, target.force)
        (_commit_in_place if target.in_place else _commit)(target, stage)
    except BaseException:  # Ctrl-C too: no partial map under any name
        shutil.rmtree(stage, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):  # not empty: someone else's now
                folder.rmdir()
        raise


def _commit(target: Target, stage: Path) -> None:
    """Rename ``stage`` to the output folder; an earlier one is renamed aside first and removed
    after, or put back if the rename fails."""
    path = target.path
    if not path.exists():
        os.rename(stage, path)
        return
    old = path.parent / f".{path.name}.rsscene-old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _commit_in_place(target: Target, stage: Path) -> None:
    """Beside the scene: the earlier map's files are removed (summary.json first, so no summary
    outlives its map), the new ones moved in (summary.json last, so none precedes it)."""
    earlier = sorted(
        (e for e in os.scandir(target.path) if e.path != str(stage)),
        key=lambda e: e.name != "summary.json",
    )
    for e in earlier:
        if _same(e.path, target.scene):
            continue
        if e.name.startswith(STAGE) and e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        elif e.name in MAP_FILES:
            os.remove(e.path)
    files = sorted(stage.iterdir(), key=lambda p: p.name == "summary.json")
    for file in files:
        os.replace(file, target.path / file.name)
    stage.rmdir()
