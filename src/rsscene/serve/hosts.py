"""The names a server answers to in a request's Host header (the guard against DNS rebinding).

Plain Python: the command line imports it at start, with or without the serve extra.
"""

from __future__ import annotations

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def served_host_names(host: str, extra: list[str]) -> list[str] | None:
    """The names a request's Host header may give, or None (any).

    Loopback and every-interface servers answer to the loopback names (a browser on this
    machine uses any of them), a server bound to one address to that address; each also to
    the ``--allow-host`` names. Bound to every interface without them, it cannot know the
    names clients use, so it takes any.
    """
    if host in ("0.0.0.0", "::"):
        return [*LOOPBACK, *extra] if extra else None
    return [*(LOOPBACK if host in LOOPBACK else [host]), *extra]
