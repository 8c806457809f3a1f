"""Permission profiles of the local API: Leitura, Operação, Gestor (payments runbook §8).

The kernel tells the API who is on the other end of its unix socket (SO_PEERCRED:
pid, uid, gid). That account's groups map to a profile through the group names of the
``[profiles]`` config section; root is always Gestor, and an account in several of
the groups gets the highest. An account in none of them has no profile at all.

Each route declares the profile it needs, on its handler, in one line::

    @requires(Profile.OPERACAO)
    async def _post_relay_test(self, request): ...

and :func:`middleware` refuses, before the handler runs, a caller whose profile is
lower — and every route that declares nothing (least privilege: a new route is
closed until someone decides who may use it). A refusal names the profile required,
in the language the request asks for (``Accept-Language``, gateway/i18n.py), as every
answer of the local API.

Why the account's groups and not the calling process's: SO_PEERCRED carries only the
primary gid, and group membership (``/etc/group``) is what an administrator edits to
grant or withdraw a profile; it takes effect on the next command, not the next login.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from .i18n import N_, for_accept_language

__all__ = [
    "DEFAULT_GROUPS",
    "PROFILE",
    "Caller",
    "Profile",
    "ProfileGroups",
    "declared_profile",
    "middleware",
    "peer_caller",
    "requires",
    "route_profiles",
]

# struct ucred, socket(7): pid_t pid, uid_t uid, gid_t gid.
_UCRED = struct.Struct("=iII")
_ATTRIBUTE = "required_profile"


class Profile(enum.IntEnum):
    """Ordered: each profile may do everything the ones below it may."""

    LEITURA = 1  # read: status, executions, audit, queues
    OPERACAO = 2  # daily operation: machines, relay tests, breakers, DLQ retry, incidents
    GESTOR = 3  # administration: destructive or irreversible actions

    @property
    def label(self) -> str:
        """The profile's name (the runbook's) as an English message of the catalog:
        translate it where the reader's language is known (pt_BR: Leitura, Operação,
        Gestor)."""
        return {1: N_("Read"), 2: N_("Operation"), 3: N_("Manager")}[self.value]


#: The config's defaults (``[profiles]``): group name of each profile.
DEFAULT_GROUPS: dict[Profile, str] = {
    Profile.LEITURA: "metalav-leitura",
    Profile.OPERACAO: "metalav-operacao",
    Profile.GESTOR: "metalav-gestor",
}


@dataclass(frozen=True)
class ProfileGroups:
    """Group name per profile (from the config)."""

    read_group: str = DEFAULT_GROUPS[Profile.LEITURA]
    operation_group: str = DEFAULT_GROUPS[Profile.OPERACAO]
    manager_group: str = DEFAULT_GROUPS[Profile.GESTOR]

    def by_profile(self) -> dict[Profile, str]:
        return {
            Profile.LEITURA: self.read_group,
            Profile.OPERACAO: self.operation_group,
            Profile.GESTOR: self.manager_group,
        }

    def profile_of(self, uid: int, gid: int) -> Profile | None:
        """The profile of the account ``uid`` (primary group ``gid`` as the kernel
        reported it): root is Gestor; else the highest profile whose group the account
        belongs to; None for none."""
        if uid == 0:
            return Profile.GESTOR
        groups = _group_names(uid, gid)
        for profile in sorted(Profile, reverse=True):
            if self.by_profile()[profile] in groups:
                return profile
        return None


def _group_names(uid: int, gid: int) -> set[str]:
    gids = {gid}
    try:
        account = pwd.getpwuid(uid)
    except KeyError:
        account = None  # a uid without a name has only the gid the kernel gave
    if account is not None:
        gids.update(os.getgrouplist(account.pw_name, account.pw_gid))
    names = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return names


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of the socket."""

    user: str  # account name, ``uid:N`` without one, "unknown" without credentials
    uid: int | None
    gid: int | None


def peer_caller(request: web.Request) -> Caller:
    """The caller's OS account, as the kernel reports it (SO_PEERCRED)."""
    transport = request.transport
    # asyncio hands out a TransportSocket wrapper, not a socket.socket; it has the
    # family and getsockopt this needs.
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return Caller("unknown", None, None)
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, gid = _UCRED.unpack(creds)
    except (OSError, struct.error):
        return Caller("unknown", None, None)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid:{uid}"
    return Caller(name, uid, gid)


Handler = Callable[..., Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


def requires(profile: Profile) -> Callable[[H], H]:
    """Declare the profile a route's handler needs (one line above the handler)."""

    def mark(handler: H) -> H:
        setattr(handler, _ATTRIBUTE, profile)
        return handler

    return mark


def declared_profile(handler: object) -> Profile | None:
    """The profile a handler declared (bound methods forward the attribute)."""
    value = getattr(handler, _ATTRIBUTE, None)
    return value if isinstance(value, Profile) else None


#: The caller's profile, for handlers that adapt to it.
PROFILE: web.RequestKey[Profile] = web.RequestKey("profile", Profile)


def _translate(request: web.Request, message: str) -> str:
    """``message`` (an English message of the catalog) in the language the client asked
    for, as gateway/api.py's answers."""
    return for_accept_language(request.headers.get("Accept-Language")).gettext(message)


def _refusal(request: web.Request, template: str, **params: object) -> web.Response:
    message = _translate(request, template).format(**params)
    return web.json_response({"error": "forbidden", "message": message}, status=403)


def middleware(groups: ProfileGroups) -> Any:
    """The aiohttp middleware that enforces each route's declared profile."""

    @web.middleware
    async def check_profile(request: web.Request, handler: Handler) -> web.StreamResponse:
        match = request.match_info
        if match.http_exception is not None:
            return await handler(request)  # 404 / 405: nothing to protect
        needed = declared_profile(match.handler)
        if needed is None:
            return _refusal(
                request,
                N_("route without a declared profile: refused by default (least privilege)"),
            )
        caller = peer_caller(request)
        have = (
            None
            if caller.uid is None or caller.gid is None
            else groups.profile_of(caller.uid, caller.gid)
        )
        if have is None or have < needed:
            group_names = ", ".join(groups.by_profile()[p] for p in Profile if p >= needed)
            if have is None:
                template = N_(
                    "permission denied: this action requires the {needed} profile; the"
                    " account {account!r} has no profile (groups that give access: {groups})"
                )
            else:
                template = N_(
                    "permission denied: this action requires the {needed} profile; the"
                    " account {account!r} has the {have} profile (groups that give access:"
                    " {groups})"
                )
            return _refusal(
                request,
                template,
                needed=_translate(request, needed.label),
                have=_translate(request, have.label) if have is not None else "",
                account=caller.user,
                groups=group_names,
            )
        request[PROFILE] = have
        return await handler(request)

    return check_profile


def route_profiles(app: web.Application) -> Iterable[tuple[str, str, Profile | None]]:
    """(method, path, declared profile) of every route of ``app``, for docs and tests."""
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = str(info.get("formatter") or info.get("path") or "")
        yield route.method, path, declared_profile(route.handler)
