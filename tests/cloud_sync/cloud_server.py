"""A real HTTP server on loopback standing in for the cloud API (docs/cloud-api.yaml).

It records every request and answers as told: ``ok`` (200 ``{"accepted": n}``), a
status code with an error body, or ``hang`` (hold the request until released)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from devtools.broker import free_port


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up on a hung request closes its socket: expected


class CloudServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Recorded] = []
        self.mode: str | int = "ok"
        self.error_body: dict[str, str] = {"error": "server_error"}
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path_suffix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    def events(self) -> list[dict[str, Any]]:
        """Every event received on the batch endpoint, in arrival order (duplicates kept)."""
        with self._lock:
            return [
                e for r in self.requests if r.path.endswith("/events") for e in r.body["events"]
            ]

    def start(self) -> CloudServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                mode = outer.mode
                if mode == "hang":
                    # Recorded before the hang: the request did reach the cloud.
                    outer._record(self, body)
                    outer.release.wait(30)
                    self._answer(200, {"accepted": 0})
                    return
                if mode == "ok":
                    outer._record(self, body)
                    n = len(body["events"]) if isinstance(body, dict) and "events" in body else 1
                    self._answer(200, {"accepted": n})
                    return
                assert isinstance(mode, int)
                outer._record(self, body)
                self._answer(mode, outer.error_body)

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = _QuietServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _record(self, handler: BaseHTTPRequestHandler, body: Any) -> None:
        with self._lock:
            self.requests.append(
                Recorded(handler.command, handler.path, dict(handler.headers.items()), body)
            )

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
