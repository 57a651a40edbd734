"""The output folder of a map: one complete map or none, never mixed with other files, never
written over its own scene.

:func:`check_target` decides, before any window is predicted, whether a folder may take a
map: a new or empty folder, or an earlier map of the same scene file and settings (recognised
by ``summary.json``'s record), or with ``force`` any earlier map. :func:`staged` then gives a
fresh folder for the files, beside the output folder, and renames it into place whole when
they are all written; an error or Ctrl-C removes it, and the earlier folder stays as it was.
A folder that holds the scene itself (and nothing else but an earlier map), or is the
working directory, stays: the files are written in a folder inside it and moved in, the
earlier map's removed first and ``summary.json`` moved last. ``summary.json`` records each
file's size and sha256 (:func:`checksum`): :func:`earlier_map` takes a map whose file was
truncated or altered since for an incomplete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsscene.errors import UserError
from rsscene.mapping.remote import RemoteName, is_remote, remote_record, scene_name

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
# summary.json's key for the size and sha256 of each other file of the map, by name.
CHECKSUMS = "checksums"
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
    scene: Path | RemoteName
    record: dict[str, Any]
    force: bool = False

    @property
    def in_place(self) -> bool:
        # Renaming the working directory away would leave the user's shell in a deleted one.
        return self.path.is_dir() and (
            (isinstance(self.scene, Path) and _same(self.scene.parent, self.path))
            or _same(Path.cwd(), self.path)
        )


def file_record(path: str | Path) -> dict[str, Any]:
    """A file's path (resolved), size and modification time: what tells it changed."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def checksum(path: Path) -> dict[str, Any]:
    """A file's size and sha256 (read in chunks): what tells it was truncated or altered."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def scene_record(
    scene: str | Path, settings: dict[str, Any], checkpoint: str | Path | None = None
) -> dict[str, Any]:
    """What recognises a map as made from this scene file (path, size, modification time; a
    remote scene's :func:`~rsscene.mapping.remote.remote_record`) with these settings, and by
    this ``checkpoint`` file: summary.json keeps it under :data:`RECORD`."""
    here = remote_record(RemoteName(scene)) if is_remote(scene) else file_record(scene)
    record = {"scene": here, "settings": settings}
    if checkpoint is not None:
        # The path alone is in the settings; a retrained last.pt keeps its path.
        record["checkpoint"] = file_record(checkpoint)
    return record


def _same(a: str | Path, b: str | Path) -> bool:
    if is_remote(a) or is_remote(b):  # no local file is a remote one
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_target(out: str | Path, scene: str | Path, record: dict[str, Any], force: bool) -> Target:
    """The folder ``out`` as a :class:`Target` for a map of ``scene``, or a one-line
    :class:`UserError` saying why not and what to do."""
    out = Path(out)
    target = Target(out, out.resolve(), scene_name(scene).resolve(), record, force)
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
    # The same command replaces its map, also after the checkpoint was retrained in place (a
    # region, which skips finished maps, tells the two apart: earlier_map).
    if difference(summary.get(RECORD), target.record)[0] not in ("same", "checkpoint"):
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
    kind, why = difference(record, target.record)
    if kind == "unknown":
        return "an earlier map without a record of its scene file and settings"
    if kind == "other":
        return why
    if kind == "file":
        return f"a map of {target.record['scene']['path']} made before the file changed"
    return f"a map of the same scene with other settings ({why})"


def difference(record: Any, wanted: dict[str, Any]) -> tuple[str, str]:
    """How an earlier map's record differs from ``wanted``: ``same``, ``unknown`` (no record),
    ``other`` (another scene), ``file`` (the scene changed), ``checkpoint`` or ``settings``;
    and the differences in words."""
    if not isinstance(record, dict) or not isinstance(record.get("scene"), dict):
        return "unknown", "no record of its scene file and settings"
    scene, now = record["scene"], wanted["scene"]
    if scene.get("path") != now["path"]:
        return "other", f"a map of another scene ({scene.get('path')})"
    # A remote file whose server did not answer the HEAD request (now or then) cannot be
    # told changed: remapping it every time would be the cost of one failed request.
    unchecked = "changes" in scene or "changes" in now
    if scene != now and not unchecked:
        return "file", "the scene file changed since"
    settings, want = record.get("settings") or {}, wanted["settings"]
    changed = _changes(settings, want)
    if changed:
        return "settings", ", ".join(changed)
    if record.get("checkpoint") != wanted.get("checkpoint"):
        if record.get("checkpoint") is None:
            return "checkpoint", "a checkpoint file it did not record"
        return "checkpoint", f"an earlier version of the checkpoint {settings.get('checkpoint')}"
    return ("same", "") if {**record, "scene": now} == wanted else ("settings", "unknown")


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Each setting that differs, as ``name old -> new``; within a group of settings (a
    stack's bands), the members that differ, each value shortened to a line's part."""
    changed = []
    for k, v in new.items():
        was = old.get(k)
        if was == v:
            continue
        if isinstance(was, dict) and isinstance(v, dict):
            changed += _changes(was, v, f"{prefix}{k}.")
        else:
            changed.append(f"{prefix}{k} {_short(was)} -> {_short(v)}")
    return changed


def _short(value: Any, width: int = 60) -> str:
    """A value for a line: a list or group shortened (a path or number is said whole)."""
    text = str(value)
    if not isinstance(value, (list, dict)) or len(text) <= width:
        return text
    return text[: width - 1] + "…"


@dataclass(frozen=True)
class Earlier:
    """What an output folder holds against the map asked for: ``kind`` as :func:`difference`
    gives it, or ``none`` (a new or empty folder) and ``incomplete``; the reason in words; the
    earlier summary (its record left out) when it is the same map, complete."""

    kind: str
    why: str = ""
    summary: dict[str, Any] | None = None


def earlier_map(target: Target) -> Earlier:
    """The map already in ``target``'s folder (checked by :func:`check_target`), if any: a map
    of the same scene, settings and checkpoint whose files are all there, as written (their
    checksums), needs no remaking."""
    path = target.path
    if not path.is_dir() or not any(
        e.name in MAP_FILES and not _same(e.path, target.scene) for e in os.scandir(path)
    ):
        return Earlier("none")
    summary = read_summary(path / "summary.json")
    if summary is None:
        return Earlier("incomplete", "an incomplete map (no summary.json)")
    kind, why = difference(summary.get(RECORD), target.record)
    if kind != "same":
        return Earlier(kind, why)
    files = summary.get("files")
    names = [Path(f).name for f in files] if isinstance(files, list) else []
    missing = [n for n in names if not (path / n).is_file()]
    if not names or missing:
        return Earlier("incomplete", f"its {', '.join(missing) or 'list of files'} is missing")
    changed = _changed(path, names, summary.pop(CHECKSUMS, None))
    if changed:
        return Earlier("incomplete", changed)
    summary.pop(RECORD)
    return Earlier("same", "", summary)


def _changed(folder: Path, names: list[str], checksums: Any) -> str:
    """Which of the files ``names`` in ``folder`` is not as its recorded checksum says, and
    how; "" when they all are."""
    for name in names:
        want = checksums.get(name) if isinstance(checksums, dict) else None
        if not isinstance(want, dict) or not isinstance(want.get("bytes"), int):
            return f"no checksum of its {name} was recorded"
        size = (folder / name).stat().st_size
        if size < want["bytes"]:
            return f"its {name} is truncated ({size:,} of {want['bytes']:,} bytes)"
        if size != want["bytes"] or checksum(folder / name)["sha256"] != want.get("sha256"):
            return f"its {name} was altered since it was written (its sha256 differs)"
    return ""


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
