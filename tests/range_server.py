"""A small HTTP server for the remote-scene tests: the files of a folder, served with single
byte ranges (206 and Content-Range, which http.server's own handler does not do) and HEAD,
and told how to fail.

Run as ``python range_server.py FOLDER``: it prints its port, then serves 127.0.0.1 until
killed. ``PUT /_rules`` (JSON: URL path -> ``status`` to answer instead, ``head`` to answer
HEAD with, ``cut_after`` bytes after which the connection is dropped, ``etag``) sets how it answers; ``GET /_log`` gives the
body bytes sent per path and every path asked for. It runs in a process of its own: in a
thread of the tests' process it went unanswered while GDAL (3.10) listed a folder, each
request waiting out curl's timeout.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

LAST_MODIFIED = "Mon, 02 Jun 2025 10:00:00 GMT"


class State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rules: dict[str, dict] = {}
        self.sent: Counter[str] = Counter()
        self.asked: list[str] = []
        self.lock = threading.Lock()


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, *args: object) -> None:
        pass

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.state.lock:
            self.state.rules = json.loads(body)
        self._reply(204, b"")

    def do_HEAD(self) -> None:
        with self.state.lock:
            refused = self.state.rules.get(self.path.split("?")[0], {}).get("head")
        if refused:  # a URL signed for GET alone
            self._reply(refused, b"")
            return
        self._answer(body=False)

    def do_GET(self) -> None:
        if self.path == "/_log":
            with self.state.lock:
                log = {"sent": dict(self.state.sent), "asked": list(self.state.asked)}
            self._reply(200, json.dumps(log).encode())
            return
        self._answer(body=True)

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, body: bool) -> None:
        state, path = self.state, self.path.split("?")[0]
        with state.lock:
            state.asked.append(path)
            rule = state.rules.get(path, {})
        file = state.root / path.lstrip("/")
        if "status" in rule or ".." in path or not file.is_file():
            self.send_response(rule.get("status", 404))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        first, last = 0, len(data) - 1
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            first, last = int(wanted[1]), min(int(wanted[2] or last), last)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", rule.get("etag", '"1"'))
        self.send_header("Last-Modified", LAST_MODIFIED)
        self.end_headers()
        if body:
            self._send(path, data[first : last + 1], rule.get("cut_after"))

    def _send(self, path: str, chunk: bytes, cut_after: int | None) -> None:
        state = self.state
        with state.lock:  # counted before it is sent: the client may be done before we are
            room = len(chunk) if cut_after is None else cut_after - state.sent[path]
            chunk, cut = chunk[: max(room, 0)], room < len(chunk)
            state.sent[path] += len(chunk)
        self.wfile.write(chunk)
        if cut:  # the connection drops mid-answer
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up on a cut answer is what the tests ask for


def main(root: str) -> None:
    handler = type("Handler", (RangeHandler,), {"state": State(Path(root))})
    server = QuietServer(("127.0.0.1", 0), handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
