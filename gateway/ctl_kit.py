"""The technician's toolbox commands of ``metalavctl`` that work on the box itself:

    metalavctl doctor [--json] [--config FILE]
    metalavctl backup PATH [--reason TEXT] [--by NAME] [--json]
    metalavctl restore PATH --reason TEXT [--by NAME] [--json] [--config FILE]

``doctor`` runs here (it must work when the daemon does not). ``backup`` asks the
running daemon for a consistent copy of its journal (the daemon can always read its
own journal) and writes it to PATH with the technician's own rights, after checking
it. ``restore`` needs the daemon stopped and works on the files directly, so it runs
as the account that owns them (``sudo``); it is recorded in the restored journal's
audit log.

Exit status (as the rest of metalavctl): 0 ok, 1 a doctor check failed, 2 usage,
3 daemon unreachable (backup), 4 refused (no permission, daemon running for a
restore, a backup that fails its checks, a file that already exists).

Text for people is in the technician's language, as the rest of metalavctl
(gateway/i18n.py); the daemon is asked for its refusals in that language too.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from .backup import BackupError, restore, verify_backup
from .config import ConfigError, GatewayConfig, load_config
from .doctor import print_checks, run_checks
from .i18n import cli_translation, language_of

__all__ = ["COMMANDS", "DEFAULT_CONFIG", "add_parsers", "run"]

COMMANDS = ("doctor", "backup", "restore")
DEFAULT_CONFIG = Path("/etc/metalav/gateway.toml")
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4

_translation = cli_translation()
_ = _translation.gettext


class _Refused(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add doctor, backup and restore to metalavctl's subcommands."""
    why = _("why (recorded in the audit log)")
    by = _("technician's name (default: your OS account)")
    text = _("check config, board, broker, clock, disk and journal; say what to fix")
    sub.add_parser("doctor", parents=[common], help=text, description=text)
    text = _("a consistent copy of the journal, daemon running")
    backup = sub.add_parser("backup", parents=[common], help=text, description=text)
    backup.add_argument("path", help=_("file to create (or a folder to create it in)"))
    backup.add_argument("--reason", default=_("manual backup"), help=why)
    backup.add_argument("--by", help=by)
    text = _("replace the journal by a verified backup (daemon stopped)")
    rest = sub.add_parser("restore", parents=[common], help=text, description=text)
    rest.add_argument("path", help=_("a file made by metalavctl backup or the daily backup"))
    rest.add_argument("--reason", required=True, help=why)
    rest.add_argument("--by", help=by)


def _config(args: argparse.Namespace) -> tuple[Path, GatewayConfig]:
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    try:
        return path, load_config(path)
    except ConfigError as exc:
        raise _Refused(
            _("invalid configuration: {problems}").format(problems="; ".join(exc.lines)),
            EXIT_USAGE,
        ) from None


def _me() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def _backup_error(exc: BackupError) -> str:
    """A backup's or restore's refusal in the technician's language."""
    return _(exc.template).format(**exc.params)


def _socket(args: argparse.Namespace) -> Path:
    # metalavctl's own rule (--socket, --config, $METALAV_API__SOCKET, default); imported
    # here because ctl imports this module.
    from .ctl import CtlError, _socket_path

    try:
        return _socket_path(args)
    except CtlError as exc:
        raise _Refused(str(exc), exc.code) from None


def _backup(args: argparse.Namespace) -> dict[str, Any]:
    dest = Path(args.path)
    if dest.is_dir():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        folder, n = dest, 1
        dest = folder / f"journal-backup-{stamp}.db"
        while dest.exists():
            n += 1
            dest = folder / f"journal-backup-{stamp}-{n}.db"
    if dest.exists():
        raise _Refused(
            _("{path} already exists; choose another name (nothing was changed)").format(
                path=dest
            )
        )
    if not dest.parent.is_dir():
        raise _Refused(_("the folder {folder} does not exist").format(folder=dest.parent))
    partial = dest.with_name(dest.name + ".partial")
    sock = _socket(args)
    transport = httpx.HTTPTransport(uds=str(sock))
    body = {"reason": args.reason, "actor": args.by}
    headers = {"Accept-Language": language_of(_translation)}  # its refusals, in our language
    try:
        with (
            httpx.Client(
                transport=transport, base_url="http://gateway", timeout=120.0, headers=headers
            ) as client,
            client.stream("POST", "/v1/backup", json=body) as resp,
        ):
            if resp.status_code >= 400:
                resp.read()
                try:
                    message = resp.json().get("message", f"HTTP {resp.status_code}")
                except ValueError:
                    message = f"HTTP {resp.status_code}"
                raise _Refused(message)
            meta = json.loads(resp.headers.get("X-Metalav-Backup", "{}"))
            with open(partial, "xb") as f:
                for chunk in resp.iter_bytes():
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    except httpx.TransportError:
        partial.unlink(missing_ok=True)
        raise _Refused(
            _(
                "the gateway does not answer at {socket}: is the service running?"
                " (systemctl status metalav-gateway)"
            ).format(socket=sock),
            EXIT_UNREACHABLE,
        ) from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise _Refused(
            _("cannot write {path}: {error}").format(path=partial, error=exc.strerror)
        ) from None
    try:
        info = verify_backup(partial, str(meta.get("gateway_id", "")))
    except BackupError as exc:
        partial.unlink(missing_ok=True)
        raise _Refused(
            _("the backup received failed its checks: {error}").format(error=_backup_error(exc))
        ) from None
    os.rename(partial, dest)
    return {**info.as_dict(), "path": str(dest)}


def _restore(args: argparse.Namespace) -> dict[str, Any]:
    config = _config(args)[1]
    try:
        return restore(
            config.journal.path,
            Path(args.path),
            config.gateway.id,
            actor=(args.by or _me()).strip()[:64],
            os_user=_me(),
            reason=args.reason.strip()[:200],
            now=time.time(),
        )
    except BackupError as exc:
        raise _Refused(
            _("{error} (nothing was changed)").format(error=_backup_error(exc))
        ) from None
    except OSError as exc:
        raise _Refused(_("the restore failed: {error}").format(error=exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; return the exit status."""
    try:
        if args.command == "doctor":
            checks = run_checks(Path(args.config) if args.config else DEFAULT_CONFIG)
            failed = any(c.status == "fail" for c in checks)
            if args.json:
                print(
                    json.dumps(
                        {"ok": not failed, "checks": [c.as_dict() for c in checks]},
                        indent=2,
                        ensure_ascii=False,
                    )
                )
            else:
                print_checks(checks)
            return EXIT_FAILED if failed else 0
        if args.command == "backup":
            data = _backup(args)
            text = _(
                "backup written to {path}: {executions} execution(s), {size} bytes,"
                " verified (integrity_check ok)"
            ).format(path=data["path"], executions=data["executions"], size=data["size"])
        else:
            data = _restore(args)
            restored = data["restored"]
            text = _(
                "journal restored from {path} (backup of {taken_at}, {executions}"
                " execution(s)); replaced file kept as {kept}; start the service:"
                " systemctl start metalav-gateway"
            ).format(
                path=restored["path"],
                taken_at=restored["taken_at"],
                executions=restored["executions"],
                kept=", ".join(data["replaced"]) or _("(there was no journal)"),
            )
    except _Refused as exc:
        if args.json:
            print(json.dumps({"error": "refused", "message": str(exc)}, ensure_ascii=False))
        print(f"metalavctl: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0
