"""The daemon's local API: JSON over HTTP on a unix socket, for ``metalavctl``.

A unix socket, not a TCP port: only users of the socket's group (the technicians'
account) can reach it, and nothing is exposed on the store's network. The kernel tells
us which OS user is on the other end (SO_PEERCRED), so every operator action is
audited with that account, plus the technician's name when they give one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import socket
import struct
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from .backup import BackupError, take_backup
from .i18n import N_, for_accept_language
from .journal import Journal, iso_utc
from .lifecycle import ExecutionState
from .operator import NOT_FOUND, OperatorActions, OperatorRefusal
from .profiles import Profile, ProfileGroups, requires
from .profiles import middleware as profile_middleware
from .sync import CloudSync

__all__ = ["LocalApi"]

API_VERSION = "v1"
MAX_REASON = 200
UNKNOWN_USER = "unknown"
# struct ucred, socket(7): pid_t pid, uid_t uid, gid_t gid.
_UCRED = struct.Struct("=iII")


class LocalApi:
    def __init__(
        self,
        socket_path: Path,
        *,
        status: Callable[[], dict[str, Any]],
        journal: Journal,
        operator: OperatorActions,
        sync: CloudSync,
        profiles: ProfileGroups | None = None,
    ) -> None:
        self._path = socket_path
        self._status = status
        self._journal = journal
        self._operator = operator
        self._sync = sync
        self._profiles = profiles or ProfileGroups()
        self._runner: web.AppRunner | None = None
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket

    async def start(self) -> None:
        # Every route's handler declares its profile (@requires); undeclared = refused.
        app = web.Application(middlewares=[profile_middleware(self._profiles)])
        v = f"/{API_VERSION}"
        app.router.add_get(f"{v}/status", self._get_status)
        app.router.add_get(f"{v}/executions", self._get_executions)
        app.router.add_get(f"{v}/executions/{{key}}", self._get_execution)
        app.router.add_post(f"{v}/executions/{{key}}/resolve", self._post_resolve)
        app.router.add_post(f"{v}/executions/{{key}}/reprocess", self._post_reprocess)
        app.router.add_get(f"{v}/payments/{{id}}/executions", self._get_payment_executions)
        app.router.add_get(f"{v}/payment-audit", self._get_payment_audit)
        app.router.add_post(f"{v}/store/{{action}}", self._post_store)
        app.router.add_get(f"{v}/log", self._get_log)
        app.router.add_get(f"{v}/machines", self._get_machines)
        app.router.add_post(f"{v}/machines/{{id}}/relay-test", self._post_relay_test)
        app.router.add_post(f"{v}/machines/{{id}}/service", self._post_service)
        app.router.add_get(f"{v}/audit", self._get_audit)
        app.router.add_get(f"{v}/breakers", self._get_breakers)
        app.router.add_post(f"{v}/breakers/{{name}}/reset", self._post_breaker_reset)
        app.router.add_get(f"{v}/dlq", self._get_dlq)
        app.router.add_get(f"{v}/dlq/{{id}}", self._get_dlq_item)
        app.router.add_post(f"{v}/dlq/retry", self._post_dlq_retry)
        app.router.add_post(f"{v}/dlq/{{id}}/archive", self._post_dlq_archive)
        app.router.add_get(f"{v}/reconcile", self._get_reconcile)
        app.router.add_post(f"{v}/cleanup", self._post_cleanup)
        app.router.add_post(f"{v}/backup", self._post_backup)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if self._path.is_socket():
            self._path.unlink()  # left by a killed daemon; we own this path
        site = web.UnixSite(self._runner, str(self._path))
        await site.start()
        created = self._path.lstat()
        self._socket_id = (created.st_dev, created.st_ino)
        os.chmod(self._path, 0o660)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        # Remove the path only while it still is the socket we bound: another daemon
        # may have bound a new one there since, and deleting it would cut its
        # technicians off while it keeps running.
        if self._socket_id is not None:
            with contextlib.suppress(FileNotFoundError):
                current = self._path.lstat()
                if (current.st_dev, current.st_ino) == self._socket_id:
                    self._path.unlink()
            self._socket_id = None

    @requires(Profile.LEITURA)
    async def _get_status(self, request: web.Request) -> web.Response:
        return web.json_response({"at": time.time(), **self._status()})

    @requires(Profile.LEITURA)
    async def _get_execution(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        details = self._journal.execution_details(key)
        if details is None:
            return _error(request, 404, "not_found", NOT_FOUND, key=key)
        return web.json_response(details)

    @requires(Profile.LEITURA)
    async def _get_executions(self, request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state") or None
        if state is not None and state not in {str(s) for s in ExecutionState}:
            names = ", ".join(ExecutionState)
            return _error(
                request,
                400,
                "bad_request",
                N_("unknown state: {state!r} ({names})"),
                state=state,
                names=names,
            )
        try:
            since = _parse_time(q.get("since"))
            until = _parse_time(q.get("until"))
        except _BadDate as exc:
            return _bad_date(request, exc)
        limit, offset = _int_id(q.get("limit", "50")), _int_id(q.get("offset", "0"))
        if limit is None or not 1 <= limit <= MAX_PAGE or offset is None:
            return _error(
                request, 400, "bad_request", N_("--limit must be from 1 to {max}"), max=MAX_PAGE
            )
        rows, total = self._journal.list_executions(
            state=state,
            machine_id=q.get("machine") or None,
            since_iso=since,
            until_iso=until,
            limit=limit,
            offset=offset,
        )
        return web.json_response(
            {"executions": rows, "total": total, "limit": limit, "offset": offset}
        )

    @requires(Profile.LEITURA)
    async def _get_payment_executions(self, request: web.Request) -> web.Response:
        payment_id = request.match_info["id"]
        rows = self._journal.executions_of_payment(payment_id)
        if not rows:
            return _error(
                request,
                404,
                "not_found",
                N_("no execution of payment {payment!r}"),
                payment=payment_id,
            )
        return web.json_response({"payment_id": payment_id, "executions": rows})

    @requires(Profile.LEITURA)
    async def _get_payment_audit(self, request: web.Request) -> web.Response:
        ref = request.query.get("provider_ref")
        key = request.query.get("idempotency_key")
        if (ref is None) == (key is None) or not (ref or key):
            return _error(
                request,
                400,
                "bad_request",
                N_("give --provider-ref or --idempotency-key (one of them)"),
            )
        found = self._journal.payment_audit(provider_ref=ref, idempotency_key=key)
        if not found:
            return _error(
                request, 404, "not_found", N_("no execution with {ref!r}"), ref=ref or key
            )
        return web.json_response(
            {
                "provider_ref": ref,
                "idempotency_key": key,
                "executions": found,
                "actuations": sum(len(e["actuations"]) for e in found),
            }
        )

    @requires(Profile.OPERACAO)
    async def _post_resolve(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        decision = body.get("decision")
        if decision not in ("released", "not_released"):
            return _error(
                request, 400, "bad_request", N_("--decision must be released or not_released")
            )
        try:
            done = self._operator.resolve(
                request.match_info["key"],
                decision == "released",
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
            )
        except OperatorRefusal as exc:
            return _refusal(request, 404 if exc.code == "not_found" else 409, exc)
        return web.json_response({"execute_key": request.match_info["key"], **done})

    @requires(Profile.OPERACAO)
    async def _post_reprocess(self, request: web.Request) -> web.Response:
        _, actor, reason = await _operator_request(request)
        try:
            done = self._operator.reprocess(
                request.match_info["key"], actor=actor, os_user=_peer_user(request), reason=reason
            )
        except OperatorRefusal as exc:
            return _refusal(request, 404 if exc.code == "not_found" else 409, exc)
        return web.json_response({"execute_key": request.match_info["key"], **done})

    @requires(Profile.OPERACAO)
    async def _post_store(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("pause", "resume"):
            return _error(
                request,
                404,
                "not_found",
                N_("no such action {action!r} (pause, resume)"),
                action=action,
            )
        _, actor, reason = await _operator_request(request)
        changed = self._operator.set_store_paused(
            action == "pause", actor=actor, os_user=_peer_user(request), reason=reason
        )
        return web.json_response({"changed": changed, **self._operator.store_status()})

    @requires(Profile.LEITURA)
    async def _get_log(self, request: web.Request) -> web.Response:
        try:
            since = _parse_time(request.query.get("since"))
        except _BadDate as exc:
            return _bad_date(request, exc)
        limit = _int_id(request.query.get("limit", "50"))
        if limit is None or not 1 <= limit <= MAX_PAGE:
            return _error(
                request, 400, "bad_request", N_("--limit must be from 1 to {max}"), max=MAX_PAGE
            )
        return web.json_response(
            {"entries": self._journal.operation_log(since_iso=since, limit=limit)}
        )

    @requires(Profile.LEITURA)
    async def _get_machines(self, request: web.Request) -> web.Response:
        return web.json_response({"machines": self._operator.machines()})

    @requires(Profile.LEITURA)
    async def _get_audit(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": self._journal.audit_entries()})

    @requires(Profile.OPERACAO)
    async def _post_relay_test(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        cycle = body.get("cycle")
        if cycle is not None and not isinstance(cycle, str):
            return _error(request, 400, "bad_request", N_("'cycle' must be text"))
        try:
            key = self._operator.technical_release(
                request.match_info["id"],
                cycle,
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
            )
        except OperatorRefusal as exc:
            return _refusal(request, 409 if exc.code != "unknown_machine" else 404, exc)
        return web.json_response({"execute_key": key}, status=202)

    @requires(Profile.OPERACAO)
    async def _post_service(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        value = body.get("out_of_service")
        if not isinstance(value, bool):
            return _error(request, 400, "bad_request", N_("'out_of_service' must be true or false"))
        try:
            changed = self._operator.set_out_of_service(
                request.match_info["id"],
                value,
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
            )
        except OperatorRefusal as exc:
            return _refusal(request, 404, exc)
        return web.json_response({"changed": changed, "out_of_service": value})

    @requires(Profile.LEITURA)
    async def _get_breakers(self, request: web.Request) -> web.Response:
        return web.json_response({"breakers": self._sync.breaker_status()})

    @requires(Profile.OPERACAO)
    async def _post_breaker_reset(self, request: web.Request) -> web.Response:
        _, actor, reason = await _operator_request(request)
        name = request.match_info["name"]
        if not self._sync.reset_breaker(
            name, actor=actor, os_user=_peer_user(request), reason=reason
        ):
            names = ", ".join(b["name"] for b in self._sync.breaker_status())
            return _error(
                request,
                404,
                "unknown_breaker",
                N_("no breaker {name!r} ({names})"),
                name=name,
                names=names,
            )
        return web.json_response({"reset": name})

    @requires(Profile.LEITURA)
    async def _get_dlq(self, request: web.Request) -> web.Response:
        archived = request.query.get("archived") == "1"
        return web.json_response({"items": self._journal.dlq(include_archived=archived)})

    @requires(Profile.LEITURA)
    async def _get_dlq_item(self, request: web.Request) -> web.Response:
        item_id = _int_id(request.match_info["id"])
        item = None if item_id is None else self._journal.outbox_item(item_id)
        if item is None:
            return _error(
                request, 404, "not_found", N_("no item {id!r}"), id=request.match_info["id"]
            )
        return web.json_response(item)

    @requires(Profile.OPERACAO)
    async def _post_dlq_retry(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        ids = body.get("ids")
        limit = body.get("limit")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 10_000
        ):
            return _error(
                request, 400, "bad_request", N_("--limit must be from 1 to {max}"), max=10_000
            )
        if body.get("all") is True:
            # The runbook reprocesses in small batches: the oldest ``limit`` first.
            ids = None if limit is None else [i["id"] for i in self._journal.dlq()[:limit]]
        elif not (
            isinstance(ids, list)
            and 0 < len(ids) <= 10_000
            and all(isinstance(i, int) and 0 < i < 2**63 for i in ids)
        ):
            return _error(request, 400, "bad_request", N_("give the ids or --all"))
        moved = self._journal.dlq_retry(
            ids, actor=actor, os_user=_peer_user(request), reason=reason, now=time.time()
        )
        self._sync.notify()
        return web.json_response({"retried": moved})

    @requires(Profile.GESTOR)
    async def _post_dlq_archive(self, request: web.Request) -> web.Response:
        _, actor, reason = await _operator_request(request)
        item_id = _int_id(request.match_info["id"])
        if item_id is None or not self._journal.dlq_archive(
            item_id, actor=actor, os_user=_peer_user(request), reason=reason, now=time.time()
        ):
            return _error(
                request,
                404,
                "not_in_dlq",
                N_("item {id!r} is not in the dead-letter queue (DLQ)"),
                id=request.match_info["id"],
            )
        return web.json_response({"archived": item_id})

    @requires(Profile.LEITURA)
    async def _get_reconcile(self, request: web.Request) -> web.Response:
        try:
            since = _parse_time(request.query.get("since", "")) or ""
        except _BadDate as exc:
            return _bad_date(request, exc)
        if not since:
            return _bad_date(request, _BadDate(""))
        return web.json_response({"since": since, **self._journal.reconcile(since)})

    @requires(Profile.GESTOR)
    async def _post_cleanup(self, request: web.Request) -> web.Response:
        body, actor, reason = await _operator_request(request)
        days = body.get("days")
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 3650:
            return _error(request, 400, "bad_request", N_("--days must be a number from 1 to 3650"))
        removed = self._sync.manual_cleanup(
            days, actor=actor, os_user=_peer_user(request), reason=reason
        )
        return web.json_response({"removed": removed})

    @requires(Profile.OPERACAO)
    async def _post_backup(self, request: web.Request) -> web.StreamResponse:
        """A consistent copy of the journal, taken here (the daemon can read its own
        journal whatever the technician's account may) and streamed to metalavctl,
        which writes it where the technician asked, with the technician's rights."""
        _, actor, reason = await _operator_request(request)
        journal = self._journal.path
        tmp = journal.with_name(f".backup-{uuid.uuid4().hex}.db")
        try:
            info = await asyncio.to_thread(
                take_backup, journal, tmp, self._journal.gateway_id, now=time.time()
            )
            self._journal.audit(
                action="journal.backup",
                target=str(journal),
                actor=actor,
                os_user=_peer_user(request),
                reason=reason,
                outcome="taken",
                now=time.time(),
                after={"executions": info.executions, "size": info.size},
            )
            meta = {k: v for k, v in info.as_dict().items() if k != "path"}
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "application/vnd.sqlite3",
                    "X-Metalav-Backup": json.dumps(meta),
                }
            )
            await resp.prepare(request)
            f = await asyncio.to_thread(tmp.open, "rb")
            with f:
                while chunk := await asyncio.to_thread(f.read, 1 << 16):
                    await resp.write(chunk)
            await resp.write_eof()
            return resp
        except BackupError as exc:
            reason = _translate(request, exc.template).format(**exc.params)
            return _error(
                request, 500, "backup_failed", N_("backup failed: {reason}"), reason=reason
            )
        finally:
            tmp.unlink(missing_ok=True)


_ID_TEXT = re.compile(r"[0-9]{1,18}")  # ASCII digits only ("²".isdigit() is True)
MAX_PAGE = 1000


def _parse_time(text: str | None) -> str | None:
    """A date or ISO 8601 time from a technician, as the journal's UTC text. Without a
    zone it is the store's local time (what the technician's clock shows)."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _BadDate(text) from None
    if parsed.tzinfo is None:
        parsed = parsed.astimezone()  # local time
    return iso_utc(parsed.timestamp())


def _int_id(text: str) -> int | None:
    return int(text) if _ID_TEXT.fullmatch(text) else None


def _error(
    request: web.Request, status: int, code: str, template: str, **params: object
) -> web.Response:
    """An error answer: a stable ``code`` and ``template`` (an English message of the
    catalog) in the language the client asked for (``Accept-Language``)."""
    message = _translate(request, template).format(**params)
    return web.json_response({"error": code, "message": message}, status=status)


def _translate(request: web.Request, template: str) -> str:
    return for_accept_language(request.headers.get("Accept-Language")).gettext(template)


def _bad_request(
    request: web.Request, code: str, template: str, **params: object
) -> web.HTTPBadRequest:
    message = _translate(request, template).format(**params)
    return web.HTTPBadRequest(
        text=json.dumps({"error": code, "message": message}), content_type="application/json"
    )


def _refusal(request: web.Request, status: int, exc: OperatorRefusal) -> web.Response:
    return _error(request, status, exc.code, exc.template, **exc.params)


class _BadDate(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _bad_date(request: web.Request, exc: _BadDate) -> web.Response:
    return _error(
        request,
        400,
        "bad_date",
        N_("invalid date: {text!r} (use YYYY-MM-DD or YYYY-MM-DDTHH:MM)"),
        text=exc.text,
    )


async def _operator_request(request: web.Request) -> tuple[dict[str, Any], str, str]:
    """The JSON body of an operator action, with its mandatory reason ("registro
    obrigatório de operação") and the technician's name (default: the OS account)."""
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request(request, "bad_request", N_("invalid JSON body")) from None
    if not isinstance(body, dict):
        body = {}
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise _bad_request(
            request,
            "reason_required",
            N_("give the reason (--reason), up to {max} characters"),
            max=MAX_REASON,
        )
    actor = body.get("actor")
    if not isinstance(actor, str) or not actor.strip():
        actor = _peer_user(request)
    return body, actor.strip()[:64], reason.strip()


def _peer_user(request: web.Request) -> str:
    """The OS account on the other end of the unix socket, as the kernel reports it
    (SO_PEERCRED): its name, ``uid:N`` for a uid without one, and "unknown" only when
    the credentials cannot be read at all."""
    transport = request.transport
    # asyncio hands out a TransportSocket wrapper here, not the socket.socket itself
    # (an isinstance check on socket.socket never matched, so every entry was
    # "unknown"); the wrapper has the family and getsockopt this needs.
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return UNKNOWN_USER
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(creds)
    except (OSError, struct.error):
        return UNKNOWN_USER
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"
