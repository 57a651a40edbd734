"""Remote scenes: rasters read window by window with HTTP range requests, through GDAL's
virtual file systems (``/vsicurl/`` for an ``http(s)://`` URL; ``/vsis3/``, ``/vsigs/`` and
``/vsiaz/`` names as GDAL reads them, with the credentials GDAL is given).

A remote name stays the string it was given, as a :class:`RemoteName`: ``Path`` would collapse
a URL's ``//``. Its record (:func:`remote_record`) is what tells, on a rerun, that the file
behind it changed.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from http import HTTPStatus
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

CURL = "/vsicurl/"
# Names GDAL reads from cloud stores itself, signing its requests with the store's credentials.
STORES = ("/vsis3/", "/vsigs/", "/vsiaz/")

# How GDAL reads a remote scene; each a default that a variable set by the user overrides.
GDAL_OPTIONS = {
    # On opening a file GDAL lists its folder for side-car files (.ovr, .msk, .aux.xml): over
    # HTTP that is a request for an index page and a HEAD per name, on a bucket a listing of
    # the prefix, all for files a COG does not have. EMPTY_DIR assumes there are none.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # curl waits forever on a server that stops answering: a connection gets 30 s, a transfer
    # that moves no byte for 60 s is dropped, and no request runs past 10 minutes.
    "GDAL_HTTP_CONNECTTIMEOUT": "30",
    "GDAL_HTTP_LOW_SPEED_TIME": "60",
    "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    "GDAL_HTTP_TIMEOUT": "600",
    # A 429 or 5xx is often passing (a busy server): retried 3 times, 1, 2 and 4 s apart,
    # rather than GDAL's default of one retry after 30 s.
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
    # Neighbouring windows share the file's tiles: the blocks read are kept in memory (25 MB
    # per file), so a tile that two windows need is downloaded once.
    "VSI_CACHE": "TRUE",
    # CPL_VSIL_CURL_ALLOWED_EXTENSIONS is left as GDAL has it, unset: any name is read (a
    # signed URL or a .vrt included), not only the extensions listed there.
}
HEAD_TIMEOUT_S = 30  # for a connection, and for each answer's next bytes


class RemoteName(str):
    """A remote raster's name as given, with the parts of a file name that a map takes from a
    ``Path``: ``name``, ``stem`` and ``suffix`` of the URL's path."""

    @property
    def url(self) -> str | None:
        """The ``http(s)://`` URL a URL or ``/vsicurl/`` name reads; None for a cloud store's."""
        text = self.removeprefix(CURL)
        return text if text.lower().startswith(("http://", "https://")) else None

    @property
    def gdal(self) -> str:
        """The name GDAL opens: a URL through ``/vsicurl/``."""
        return str(self) if self.startswith("/vsi") else CURL + self

    @property
    def where(self) -> PurePosixPath:
        """The name as a path, ``/scheme/host/path`` for a URL (query left out): what tells
        two scenes with the same file name apart."""
        if self.url is None:
            return PurePosixPath(self)
        parts = urlsplit(self.url)
        path = PurePosixPath("/", unquote(parts.path))
        return PurePosixPath("/", parts.scheme.lower(), parts.netloc, *path.parts[1:])

    @property
    def name(self) -> str:
        return self.where.name

    @property
    def stem(self) -> str:
        return self.where.stem

    @property
    def suffix(self) -> str:
        return self.where.suffix

    def resolve(self) -> RemoteName:
        """The name itself: a URL is absolute already."""
        return self


def is_remote(name: object) -> bool:
    """Whether ``name`` is a URL or a GDAL network file system's path, not a local file."""
    text = str(name)
    return text.lower().startswith(("http://", "https://")) or text.startswith((CURL, *STORES))


def gdal_path(name: str) -> str:
    """The name GDAL opens for a path or URL: a URL through ``/vsicurl/``, others as given."""
    return RemoteName(name).gdal if is_remote(name) else name


def scene_name(name: str | Path) -> Path | RemoteName:
    """A scene's name as its kind keeps it: a :class:`RemoteName`, else a ``Path``."""
    return RemoteName(str(name)) if is_remote(name) else Path(name)


def gdal_options() -> dict[str, str]:
    """:data:`GDAL_OPTIONS` but those the user set in the environment."""
    return {k: v for k, v in GDAL_OPTIONS.items() if k not in os.environ}


def remote_failure(error: BaseException, reading: bool) -> str:
    """What went wrong opening (or ``reading``) a remote scene, in words, from the messages
    GDAL gave: an HTTP status, curl's error, or else what GDAL said."""
    messages, cause = [], error
    while cause is not None and len(messages) < 10:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    said = next((m for m in messages[1:] if m), messages[0]).splitlines()[0][:200]
    text = "\n".join(messages)
    status = re.search(r"HTTP response code: (\d{3})", text)
    if status:
        code = int(status[1])
        try:
            return f"HTTP {code} {HTTPStatus(code).phrase.lower()}"
        except ValueError:  # a code HTTP does not name
            return f"HTTP {code}"
    curl = re.search(r"CURL error: ([^\n]*)", text)
    if curl:
        refused = re.search(r"refused|could not connect|failed to connect", curl[1], re.I)
        return f"{'connection refused' if refused else 'network error'} ({curl[1][:200]})"
    if reading:
        # curl's report of a cut transfer reaches GDAL's debug log only; what is raised is
        # the decoder's "read error ... got 0 bytes".
        return f"reading failed part way: the connection dropped or the file is damaged ({said})"
    return f"not a readable raster, or not all of its header arrived ({said})"


def remote_record(name: RemoteName) -> dict[str, Any]:
    """What tells that a remote scene changed: the size, ETag and Last-Modified its server
    gives in answer to one HEAD request. A cloud store's name is recorded alone: GDAL signs
    its requests with credentials rsscene does not hold, so a changed object goes unnoticed."""
    url = name.url
    if url is None:
        return {"path": str(name), "changes": "not checked: a cloud store's object, by name"}
    try:
        headers, size = _headers(url)
    except (OSError, HTTPException, ValueError) as e:  # it was read a moment ago: don't fail
        return {"path": str(name), "changes": f"not checked ({str(e)[:200]})"}
    return {
        "path": str(name),
        "bytes": size,
        "etag": headers.get("ETag"),
        "last_modified": headers.get("Last-Modified"),
    }


def _headers(url: str) -> tuple[Any, int | None]:
    """The answer's headers and the file's size: from a HEAD request, or where a server
    refuses HEAD (a URL signed for GET alone), from the first byte's GET."""
    try:
        head = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(head, timeout=HEAD_TIMEOUT_S) as r:
            length = r.headers.get("Content-Length")
            return r.headers, int(length) if length is not None else None
    except urllib.error.HTTPError as e:
        if e.code not in (403, 405, 501):
            raise
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    with urllib.request.urlopen(request, timeout=HEAD_TIMEOUT_S) as r:
        # 206 says the size after the range; a server without ranges sends it all (200).
        total = (r.headers.get("Content-Range") or "").rpartition("/")[2]
        if r.status == 200:
            total = r.headers.get("Content-Length") or ""
        return r.headers, int(total) if total.isdigit() else None
