"""The daemon's local API: JSON over HTTP on a unix socket, for ``metalavctl``.

A unix socket, not a TCP port: only users of the socket's group (the technicians'
account) can reach it, and nothing is exposed on the store's network. The kernel tells
us which OS user is on the other end (SO_PEERCRED), so every operator action is
audited with that account, plus the technician's name when they give one.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .executor import Executor, ExecutorRefusal
from .journal import Journal

__all__ = ["LocalApi"]

API_VERSION = "v1"
MAX_REASON = 200


class LocalApi:
    def __init__(
        self,
        socket_path: Path,
        *,
        status: Callable[[], dict[str, Any]],
        journal: Journal,
        executor: Executor,
    ) -> None:
        self._path = socket_path
        self._status = status
        self._journal = journal
        self._executor = executor
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        v = f"/{API_VERSION}"
        app.router.add_get(f"{v}/status", self._get_status)
        app.router.add_get(f"{v}/executions/{{key}}", self._get_execution)
        app.router.add_get(f"{v}/machines", self._get_machines)
        app.router.add_post(f"{v}/machines/{{id}}/relay-test", self._post_relay_test)
        app.router.add_post(f"{v}/machines/{{id}}/service", self._post_service)
        app.router.add_get(f"{v}/audit", self._get_audit)
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
        details = self._journal.execution_details(key)
        if details is None:
            return _error(404, "not_found", f"execução {key!r} não encontrada no diário")
        return web.json_response(details)

    async def _get_machines(self, request: web.Request) -> web.Response:
        return web.json_response({"machines": self._executor.machines()})

    async def _get_audit(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": self._journal.audit_entries()})

    async def _post_relay_test(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        cycle = body.get("cycle")
        if cycle is not None and not isinstance(cycle, str):
            return _error(400, "bad_request", "'cycle' deve ser texto")
        try:
            key = self._executor.technical_release(
                request.match_info["id"],
                cycle,
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
            )
        except ExecutorRefusal as exc:
            return _error(409 if exc.code != "unknown_machine" else 404, exc.code, str(exc))
        return web.json_response({"execute_key": key}, status=202)

    async def _post_service(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        value = body.get("out_of_service")
        if not isinstance(value, bool):
            return _error(400, "bad_request", "'out_of_service' deve ser true ou false")
        try:
            changed = self._executor.set_out_of_service(
                request.match_info["id"],
                value,
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
            )
        except ExecutorRefusal as exc:
            return _error(404, exc.code, str(exc))
        return web.json_response({"changed": changed, "out_of_service": value})


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def _operator_request(request: web.Request) -> tuple[dict[str, Any], str, str]:
    """The JSON body of an operator action, with its mandatory reason ("registro
    obrigatório de operação") and the technician's name (default: the OS account)."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(
            text='{"error": "bad_request", "message": "corpo JSON inválido"}',
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        body = {}
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise web.HTTPBadRequest(
            text='{"error": "reason_required", "message": "informe o motivo (--reason), '
            f'até {MAX_REASON} caracteres"}}',
            content_type="application/json",
        )
    actor = body.get("actor")
    if not isinstance(actor, str) or not actor.strip():
        actor = _peer_user(request)
    return body, actor.strip()[:64], reason.strip()


def _peer_user(request: web.Request) -> str:
    """The OS account on the other end of the unix socket (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
        return "unknown"
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"
