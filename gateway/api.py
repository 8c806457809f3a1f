"""The daemon's local API: JSON over HTTP on a unix socket, for ``metalavctl``.

A unix socket, not a TCP port: only users of the socket's group (the technicians'
account) can reach it, and nothing is exposed on the store's network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["LocalApi"]

API_VERSION = "v1"


class LocalApi:
    def __init__(
        self,
        socket_path: Path,
        *,
        status: Callable[[], dict[str, Any]],
        execution: Callable[[str], dict[str, Any] | None],
    ) -> None:
        self._path = socket_path
        self._status = status
        self._execution = execution
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(f"/{API_VERSION}/status", self._get_status)
        app.router.add_get(f"/{API_VERSION}/executions/{{key}}", self._get_execution)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._path.is_socket():
            self._path.unlink()  # left by a killed daemon; we own this path
        site = web.UnixSite(self._runner, str(self._path))
        await site.start()
        os.chmod(self._path, 0o660)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._path.unlink(missing_ok=True)

    async def _get_status(self, request: web.Request) -> web.Response:
        return web.json_response({"at": time.time(), **self._status()})

    async def _get_execution(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        details = self._execution(key)
        if details is None:
            return web.json_response({"error": "not_found", "execute_key": key}, status=404)
        return web.json_response(details)
