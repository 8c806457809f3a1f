"""Permission profiles (issue 12, item 6): every metalavctl command against a running
daemon, as every profile, from real OS accounts the test creates, over the real
socket (the kernel's SO_PEERCRED decides who is calling)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway import api
from gateway.profiles import Profile, ProfileGroups, middleware, requires

from .conftest import Store, wait_until
from .test_api import _env_for_other_account, _interpreter_for

READ, OPER, MGR = Profile.LEITURA, Profile.OPERACAO, Profile.GESTOR
#: The profiles' names as a pt_BR technician reads them (the runbook's).
PT_NAME = {READ: "Leitura", OPER: "Operação", MGR: "Gestor"}

#: The matrix, as documented in docs/runbook.md ("Perfis"): each command and the
#: least profile that may run it.
MATRIX: list[tuple[list[str], Profile]] = [
    (["status"], READ),
    (["execution", "exec-nao-existe"], READ),
    (["machines"], READ),
    (["audit"], READ),
    (["breakers"], READ),
    (["dlq", "list"], READ),
    (["dlq", "show", "999999"], READ),
    (["reconcile", "--since", "2026-01-01"], READ),
    (["executions"], READ),
    (["execution", "--payment", "pay-nao-existe"], READ),
    (["audit", "--provider-ref", "ref-nao-existe"], READ),
    (["log"], READ),
    (["machine", "out-of-service", "D2", "--reason", "teste de perfil"], OPER),
    (["machine", "in-service", "D2", "--reason", "teste de perfil"], OPER),
    (["relay", "test", "D1", "--reason", "teste de perfil"], OPER),
    (["breakers", "reset", "mqtt", "--reason", "teste de perfil"], OPER),
    (["dlq", "retry", "--all", "--reason", "teste de perfil"], OPER),
    (["backup", "{backup_dir}", "--reason", "teste de perfil"], OPER),
    (["resolve", "exec-nao-existe", "--decision", "released", "--reason", "teste"], OPER),
    (["reprocess", "exec-nao-existe", "--reason", "teste de perfil"], OPER),
    (["store", "pause", "--reason", "teste de perfil"], OPER),
    (["store", "resume", "--reason", "teste de perfil"], OPER),
    (["dlq", "archive", "999999", "--reason", "teste de perfil"], MGR),
    (["cleanup", "--days", "3650", "--reason", "teste de perfil"], MGR),
]

GROUPS = ProfileGroups(
    read_group="mlt-leitura", operation_group="mlt-operacao", manager_group="mlt-gestor"
)
# Account -> its profile groups (the Gestor is in Leitura too: the highest counts).
ACCOUNTS: dict[str, tuple[Profile | None, list[str]]] = {
    "mltu-nenhum": (None, []),
    "mltu-leitor": (READ, [GROUPS.read_group]),
    "mltu-operador": (OPER, [GROUPS.operation_group]),
    "mltu-gestor": (MGR, [GROUPS.read_group, GROUPS.manager_group]),
}

# Runs as the account: every command in one interpreter (one start-up, not 16),
# each through metalavctl's own main(), over the socket.
_RUNNER = """
import contextlib, io, json, sys
from gateway.ctl import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    out.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(out))
"""


@pytest.fixture
def accounts() -> Iterator[dict[str, tuple[Profile | None, list[str]]]]:
    if os.geteuid() != 0:
        pytest.skip("creating OS accounts and running metalavctl as them needs root")
    for group in GROUPS.by_profile().values():
        subprocess.run(["groupadd", "--system", "-f", group], check=True, timeout=30)
    for name, (_, groups) in ACCOUNTS.items():
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                check=True,
                capture_output=True,
                timeout=30,
            )
        # Exactly the groups of the matrix, whatever an earlier run left.
        subprocess.run(["usermod", "-G", ",".join(groups), name], check=True, timeout=30)
    yield ACCOUNTS


def _run_all(sock: Path, user: str | None, commands: list[list[str]]) -> list[dict[str, object]]:
    argvs = [[*c, "--socket", str(sock)] for c in commands]
    if user is None:
        interpreter, kwargs = sys.executable, {}
    else:
        account = pwd.getpwnam(user)
        interpreter = _interpreter_for(user)
        kwargs = {
            "user": account.pw_uid,
            "group": account.pw_gid,
            "extra_groups": [],  # the profile comes from the account, not the process
            "cwd": "/",
            # The technician's language, as root's (conftest): the refusals are read below.
            "env": {**_env_for_other_account(), "LANGUAGE": "pt_BR"},
        }
    done = subprocess.run(
        [interpreter, "-c", _RUNNER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,  # type: ignore[call-overload]
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_every_command_is_refused_below_its_profile_and_allowed_from_it(
    store_factory: Callable[..., Store], accounts: dict[str, tuple[Profile | None, list[str]]]
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="metalav-profiles-"))
    try:
        folder.chmod(0o711)
        backups = folder / "backups"
        backups.mkdir()
        backups.chmod(0o777)  # each account writes its own backup here
        store = store_factory(
            sections={
                "profiles": {
                    "read_group": GROUPS.read_group,
                    "operation_group": GROUPS.operation_group,
                    "manager_group": GROUPS.manager_group,
                }
            }
        )
        sock = folder / "metalav.sock"
        store.daemon.socket = sock
        store.daemon.start(METALAV_API__SOCKET=str(sock))
        store.daemon.wait_ready()
        sock.chmod(0o666)  # the socket's group is not what this test is about

        commands = [[a.replace("{backup_dir}", str(backups)) for a in argv] for argv, _ in MATRIX]
        callers: list[tuple[str | None, Profile | None]] = [
            (name, profile) for name, (profile, _) in accounts.items()
        ]
        callers.append((None, MGR))  # root is always Gestor
        for user, have in callers:
            results = _run_all(sock, user, commands)
            for (argv, needed), result in zip(MATRIX, results, strict=True):
                refused = "permissão negada" in str(result["stderr"])
                who = user or "root"
                if have is None or have < needed:
                    assert refused and result["code"] == 4, (who, argv, result)
                    assert f"requer o perfil {PT_NAME[needed]}" in str(result["stderr"])
                    assert "Traceback" not in str(result["stderr"])
                else:
                    assert not refused, (who, argv, result)
                    # Allowed: done, or an answer of the command itself (unknown id).
                    assert result["code"] in (0, 1), (who, argv, result)
        # Only the allowed ones acted: one relay test each from operador, gestor and
        # root; none from the reader or the account without a profile.
        wait_until(lambda: len(store.actuations()) >= 3, what="three relay tests")
        assert len(store.actuations()) == 3
        allowed_backups = [p for p in backups.iterdir() if p.suffix == ".db"]
        assert len(allowed_backups) == 3, allowed_backups
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_route_that_declares_no_profile_is_refused_even_to_root(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, dict[str, str], dict[str, str], int]:
        async def undeclared(request: web.Request) -> web.Response:
            return web.json_response({"leaked": True})

        @requires(Profile.LEITURA)
        async def declared(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        app = web.Application(middlewares=[middleware(ProfileGroups())])
        app.router.add_get("/undeclared", undeclared)
        app.router.add_get("/declared", declared)
        runner = web.AppRunner(app)
        await runner.setup()
        path = tmp_path / "api.sock"
        await web.UnixSite(runner, str(path)).start()
        try:
            return (
                *(await _get(path, "/undeclared", "pt-BR,pt;q=0.9")),
                (await _get(path, "/undeclared"))[1],
                (await _get(path, "/declared"))[0],
            )
        finally:
            await runner.cleanup()

    status, body, english, declared_status = asyncio.run(scenario())
    # In the language the client asks for (metalavctl sends its own), English without.
    assert status == 403 and "menor privilégio" in body["message"]
    assert english["error"] == "forbidden" and "least privilege" in english["message"]
    assert declared_status == 200


async def _get(path: Path, route: str, language: str | None = None) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    accept = f"Accept-Language: {language}\r\n" if language else ""
    writer.write(
        f"GET {route} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_profile_of_root_is_gestor_and_unknown_uids_have_none() -> None:
    assert GROUPS.profile_of(0, 0) is Profile.GESTOR
    free_uid = 61_234
    while True:
        try:
            pwd.getpwuid(free_uid)
        except KeyError:
            break
        free_uid += 1
    assert GROUPS.profile_of(free_uid, free_uid) is None


#: Every route of the local API and the profile it declares: the matrix of
#: docs/runbook.md §8 seen from the API. A route added without a decision here fails
#: this test (and is refused to everybody at run time until it declares one).
ROUTES: dict[tuple[str, str], Profile] = {
    ("get", "/status"): READ,
    ("get", "/executions/{key}"): READ,
    ("get", "/machines"): READ,
    ("get", "/audit"): READ,
    ("get", "/breakers"): READ,
    ("get", "/dlq"): READ,
    ("get", "/dlq/{id}"): READ,
    ("get", "/reconcile"): READ,
    ("get", "/executions"): READ,
    ("get", "/payments/{id}/executions"): READ,
    ("get", "/payment-audit"): READ,
    ("get", "/log"): READ,
    ("post", "/machines/{id}/relay-test"): OPER,
    ("post", "/machines/{id}/service"): OPER,
    ("post", "/breakers/{name}/reset"): OPER,
    ("post", "/dlq/retry"): OPER,
    ("post", "/backup"): OPER,
    ("post", "/executions/{key}/resolve"): OPER,
    ("post", "/executions/{key}/reprocess"): OPER,
    ("post", "/store/{action}"): OPER,
    ("post", "/dlq/{id}/archive"): MGR,
    ("post", "/cleanup"): MGR,
}


def _declared_routes() -> dict[tuple[str, str], Profile | None]:
    """(method, path) -> declared profile, read from gateway/api.py's source: the
    ``add_<method>(f"{v}/path", self._handler)`` calls and each handler's
    ``@requires(Profile.X)``."""
    tree = ast.parse(Path(api.__file__).read_text())
    declared: dict[str, Profile | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef):
            declared[node.name] = None
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and isinstance(deco.func, ast.Name)
                    and deco.func.id == "requires"
                    and isinstance(deco.args[0], ast.Attribute)
                ):
                    declared[node.name] = Profile[deco.args[0].attr]
    routes: dict[tuple[str, str], Profile | None] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("add_")
            and len(node.args) == 2
            and isinstance(node.args[0], ast.JoinedStr)
            and isinstance(node.args[1], ast.Attribute)
        ):
            path = "".join(
                str(part.value) for part in node.args[0].values if isinstance(part, ast.Constant)
            )
            routes[(node.func.attr.removeprefix("add_"), path)] = declared.get(node.args[1].attr)
    return routes


def test_every_api_route_declares_the_profile_of_the_documented_matrix() -> None:
    assert _declared_routes() == ROUTES
