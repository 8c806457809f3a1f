"""``metalavctl doctor``: is this box fit to release machines? (issue 12, item 4)

Each check answers with a status (``ok``, ``warn``, ``fail``, ``skip``), what it saw,
and, when it is not ok, what to do — in Portuguese, for the technician at the store.
The checks only read: the journal is opened read-only, and the board is asked for a
ping only when no daemon runs (and then under the journal's instance lock, so the
daemon cannot start and find its port taken); with a daemon running, its own status
tells how the board and the broker are.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from . import instance_lock
from .backup import backup_dir, hold_journal_lock, scheduled_backups
from .boards import build_driver
from .config import ConfigError, GatewayConfig, load_config
from .journal import SCHEMA_VERSION

__all__ = ["Check", "run_checks"]

#: The account the systemd unit runs the daemon as (systemd/metalav-gateway.service).
SERVICE_ACCOUNT = "metalav"
DISK_FAIL_BYTES = 100 * 1024 * 1024
DISK_WARN_BYTES = 500 * 1024 * 1024
CERT_WARN_DAYS = 30
NET_TIMEOUT_S = 3.0
BOARD_TIMEOUT_S = 3.0
# adjtimex(2): the clock state TIME_ERROR means "not synchronized".
_TIME_ERROR = 5


@dataclass(frozen=True)
class Check:
    name: str  # stable id for scripts
    title: str  # what a technician reads
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _ok(name: str, title: str, detail: str) -> Check:
    return Check(name, title, "ok", detail)


def _daemon_status(config: GatewayConfig) -> tuple[dict[str, Any] | None, str]:
    """The running daemon's status, or None and why not."""
    transport = httpx.HTTPTransport(uds=str(config.api.socket))
    try:
        with httpx.Client(transport=transport, base_url="http://gateway", timeout=5.0) as c:
            resp = c.get("/v1/status")
    except httpx.TransportError:
        return None, "unreachable"
    if resp.status_code == 403:
        return None, "forbidden"
    try:
        return resp.json(), ""
    except ValueError:
        return None, "bad answer"


def check_config(path: Path) -> tuple[Check, GatewayConfig | None]:
    title = "Configuração"
    try:
        config = load_config(path)
    except ConfigError as exc:
        return (
            Check(
                "config",
                title,
                "fail",
                "; ".join(exc.lines),
                f"corrija {path} e confira com: metalav-gateway check-config --config {path}",
            ),
            None,
        )
    return _ok(
        "config", title, f"{path}: gateway {config.gateway.id}, {len(config.machines)} máquina(s)"
    ), config


def check_daemon(config: GatewayConfig, status: dict[str, Any] | None, why: str) -> Check:
    title = "Serviço do gateway"
    if status is not None:
        d = status.get("daemon", {})
        return _ok("daemon", title, f"em execução (pid {d.get('pid')}, versão {d.get('version')})")
    if why == "forbidden":
        return Check(
            "daemon",
            title,
            "warn",
            "em execução, mas sua conta não tem perfil para ler o status",
            "peça ao gestor para incluir sua conta no grupo do perfil Leitura",
        )
    holder = _lock_holder(config.journal.path)
    if holder:
        return Check(
            "daemon",
            title,
            "fail",
            f"o processo {holder} segura o diário, mas não responde em {config.api.socket}",
            "reinicie o serviço: systemctl restart metalav-gateway; "
            "veja o log: journalctl -u metalav-gateway -n 100",
        )
    return Check(
        "daemon",
        title,
        "fail",
        "parado: nenhum comando pago é liberado",
        "inicie: systemctl start metalav-gateway; se não subir: "
        "journalctl -u metalav-gateway -n 100",
    )


def _lock_holder(journal: Path) -> str:
    """'pid N' when a process holds the journal's instance lock, else ''."""
    if not instance_lock.lock_path(journal).exists():
        return ""  # no daemon ever ran on this journal
    try:
        with hold_journal_lock(journal):
            return ""
    except instance_lock.AlreadyRunning as exc:
        return f"pid {exc.pid}" if exc.pid else "outro processo"
    except instance_lock.InstanceLockError:
        return ""


def check_port(config: GatewayConfig) -> Check:
    board = config.board
    title = "Porta da placa de relés"
    target = board.gpio.chip if board.driver == "gpio" else board.port
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return Check(
            "serial_port",
            title,
            "fail",
            f"{target} não existe",
            "confira o cabo USB e a alimentação da placa; veja as portas com: "
            "ls -l /dev/serial/by-id/; ajuste [board] port na configuração",
        )
    except OSError as exc:
        return Check(
            "serial_port",
            title,
            "fail",
            f"{target}: {exc.strerror}",
            "confira a porta em [board] port",
        )
    if not stat.S_ISCHR(st.st_mode):
        return Check(
            "serial_port",
            title,
            "fail",
            f"{target} não é um dispositivo serial",
            "ajuste [board] port para a porta da placa (ex.: /dev/ttyACM0)",
        )
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.filemode(st.st_mode)
    detail = f"{target} ({mode}, grupo {group})"
    try:
        account = pwd.getpwnam(SERVICE_ACCOUNT)
    except KeyError:
        return _ok("serial_port", title, detail)
    groups = {g for g in os.getgrouplist(account.pw_name, account.pw_gid)}
    can = (
        account.pw_uid == 0
        or (account.pw_uid == st.st_uid and st.st_mode & 0o600 == 0o600)
        or (st.st_gid in groups and st.st_mode & 0o060 == 0o060)
        or st.st_mode & 0o006 == 0o006
    )
    if not can:
        return Check(
            "serial_port",
            title,
            "fail",
            f"{detail}: a conta {SERVICE_ACCOUNT} não pode ler e escrever nela",
            f"inclua a conta no grupo da porta: usermod -aG {group} {SERVICE_ACCOUNT}; "
            "depois: systemctl restart metalav-gateway",
        )
    return _ok("serial_port", title, detail)


def check_board(config: GatewayConfig, status: dict[str, Any] | None) -> Check:
    title = "Resposta da placa"
    fix = (
        "confira o cabo USB e a alimentação da placa; se a placa travou, desligue e "
        "ligue a placa; depois: metalavctl status"
    )
    if status is not None:
        b = status.get("board", {})
        if b.get("connected"):
            return _ok(
                "board", title, f"respondendo em {b.get('port')} (boot id {b.get('boot_id')})"
            )
        return Check(
            "board",
            title,
            "fail",
            f"o gateway não fala com a placa em {b.get('port')}: "
            f"{b.get('last_error') or 'sem resposta'}",
            fix,
        )
    try:
        with hold_journal_lock(config.journal.path):
            pong = asyncio.run(_ping_board(config))
    except instance_lock.AlreadyRunning:
        return Check(
            "board", title, "skip", "o gateway está rodando; pergunte com metalavctl status"
        )
    except instance_lock.InstanceLockError as exc:
        return Check("board", title, "skip", f"não foi possível testar sem o serviço: {exc}")
    except Exception as exc:  # the driver's errors, whatever the driver
        return Check("board", title, "fail", f"sem resposta: {exc or type(exc).__name__}", fix)
    return _ok("board", title, f"respondeu (boot id {pong})")


async def _ping_board(config: GatewayConfig) -> str:
    driver = build_driver(config, lambda fault: None)
    try:
        async with asyncio.timeout(BOARD_TIMEOUT_S):
            await driver.open()
            pong = await driver.ping()
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
    return f"{pong.boot_id:08x}"


def check_broker(config: GatewayConfig, status: dict[str, Any] | None) -> Check:
    title = "Broker MQTT"
    m = config.mqtt
    where = f"{m.host}:{m.port}"
    try:
        sock = socket.create_connection((m.host, m.port), timeout=NET_TIMEOUT_S)
    except OSError as exc:
        return Check(
            "broker",
            title,
            "fail",
            f"{where} inalcançável: {exc.strerror or exc}",
            "confira a internet da loja (ping 8.8.8.8) e [mqtt] host/port; os comandos "
            "ficam guardados na nuvem e chegam quando a conexão voltar",
        )
    expiry = ""
    with sock:
        if m.tls_ca_file or m.tls_cert_file:
            try:
                context = ssl.create_default_context(
                    cafile=str(m.tls_ca_file) if m.tls_ca_file else None
                )
                if m.tls_cert_file:
                    context.load_cert_chain(
                        str(m.tls_cert_file), str(m.tls_key_file) if m.tls_key_file else None
                    )
                with context.wrap_socket(sock, server_hostname=m.host) as tls:
                    cert = tls.getpeercert() or {}
            except (ssl.SSLError, OSError) as exc:
                return Check(
                    "broker",
                    title,
                    "fail",
                    f"{where}: TLS recusado: {exc}",
                    "confira [mqtt] tls_ca_file, tls_cert_file e tls_key_file e o relógio "
                    "da caixa (certificados dependem da data)",
                )
            days = _days_left(cert.get("notAfter"))
            if days is not None:
                expiry = f"; certificado do broker vence em {days} dia(s)"
                if days < 0:
                    return Check(
                        "broker",
                        title,
                        "fail",
                        f"{where}: certificado vencido",
                        "avise o suporte: o certificado do broker venceu",
                    )
            client_days = _client_cert_days(m.tls_cert_file)
            if client_days is not None:
                expiry += f"; certificado desta caixa vence em {client_days} dia(s)"
                if client_days < 0:
                    return Check(
                        "broker",
                        title,
                        "fail",
                        f"{where}: certificado da caixa vencido",
                        "peça ao suporte um novo certificado para este gateway",
                    )
                days = client_days if days is None else min(days, client_days)
            if days is not None and days < CERT_WARN_DAYS:
                return Check(
                    "broker",
                    title,
                    "warn",
                    f"{where} alcançável{expiry}",
                    "peça ao suporte a renovação do certificado antes do vencimento",
                )
    linked = ""
    if status is not None:
        linked = (
            "; gateway conectado"
            if status.get("broker", {}).get("connected")
            else ("; o gateway ainda NÃO está conectado")
        )
    return _ok("broker", title, f"{where} alcançável{expiry}{linked}")


def _days_left(not_after: object) -> int | None:
    if not isinstance(not_after, str):
        return None
    expires = ssl.cert_time_to_seconds(not_after)
    return int((expires - time.time()) // 86400)


def _client_cert_days(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError, ImportError):
        return None
    return int((cert.not_valid_after_utc - datetime.now(UTC)).total_seconds() // 86400)


def _clock_synchronized() -> bool | None:
    """True / False when the system can tell, None when it cannot."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip() in ("yes", "no"):
            return out.stdout.strip() == "yes"
    # No systemd to ask (a container): the kernel's own flag, adjtimex(2) read-only.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes = 0 (read)
        state = int(libc.adjtimex(buf))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def check_clock(sync: Callable[[], bool | None] = _clock_synchronized) -> Check:
    title = "Relógio"
    now = datetime.now().astimezone().strftime("%d/%m/%Y %H:%M:%S %Z")
    synced = sync()
    if synced:
        return _ok("clock", title, f"sincronizado ({now})")
    fix = (
        "confira a internet e o NTP: timedatectl status; systemctl restart "
        "systemd-timesyncd. O gateway não reembolsa nem recusa comandos por causa do "
        "próprio relógio, mas os horários do diário ficam errados"
    )
    if synced is None:
        return Check("clock", title, "warn", f"não foi possível saber se sincroniza ({now})", fix)
    return Check("clock", title, "warn", f"NÃO sincronizado ({now})", fix)


def check_disk(config: GatewayConfig) -> Check:
    title = "Espaço em disco"
    folder = config.journal.path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    detail = (
        f"{usage.free // (1024 * 1024)} MB livres de {usage.total // (1024 * 1024)} MB em {folder}"
    )
    fix = (
        'libere espaço: metalavctl cleanup --days 30 --reason "disco cheio"; apague backups '
        f"antigos em {backup_dir(config.journal.path, config.backup.dir)}; veja: df -h"
    )
    if usage.free < DISK_FAIL_BYTES:
        return Check("disk", title, "fail", detail + " — o diário pode parar de gravar", fix)
    if usage.free < DISK_WARN_BYTES or usage.free < usage.total * 0.10:
        return Check("disk", title, "warn", detail, fix)
    return _ok("disk", title, detail)


def check_journal(config: GatewayConfig) -> Check:
    title = "Diário (integridade)"
    path = config.journal.path
    if not path.exists():
        return Check(
            "journal",
            title,
            "warn",
            f"{path} ainda não existe",
            "o gateway cria o diário ao iniciar: systemctl start metalav-gateway",
        )
    restore_fix = (
        "pare o serviço (systemctl stop metalav-gateway), restaure o último backup "
        f"(metalavctl restore {backup_dir(path, config.backup.dir)}/journal-....db "
        '--reason "diário corrompido") e inicie de novo; avise o suporte'
    )
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        return Check("journal", title, "fail", f"{path}: não abre ({exc})", restore_fix)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return Check("journal", title, "fail", f"{path}: {exc}", restore_fix)
    finally:
        conn.close()
    if rows != ["ok"]:
        return Check("journal", title, "fail", f"{path}: corrompido ({rows[0]})", restore_fix)
    if version > SCHEMA_VERSION:
        return Check(
            "journal",
            title,
            "fail",
            f"{path}: esquema {version}, mais novo que este gateway ({SCHEMA_VERSION})",
            "instale a versão do gateway que gravou este diário",
        )
    return _ok("journal", title, f"{path}: íntegro (esquema {version})")


def check_backups(config: GatewayConfig, now: float | None = None) -> Check:
    title = "Backups do diário"
    folder = backup_dir(config.journal.path, config.backup.dir)
    if not config.backup.enabled:
        return Check(
            "backups",
            title,
            "warn",
            "backup diário desligado ([backup] enabled)",
            "ligue o backup diário ou faça um agora: metalavctl backup ARQUIVO",
        )
    found = scheduled_backups(folder)
    if not found:
        return Check(
            "backups",
            title,
            "warn",
            f"nenhum backup em {folder}",
            "faça um agora: metalavctl backup ARQUIVO (o gateway faz um por dia)",
        )
    newest = found[-1]
    age_h = ((now or time.time()) - newest.stat().st_mtime) / 3600
    detail = f"{len(found)} em {folder}; o mais recente há {age_h:.0f} h ({newest.name})"
    if age_h > 2 * config.backup.interval_h:
        return Check(
            "backups",
            title,
            "warn",
            detail,
            "veja o log do serviço (journalctl -u metalav-gateway | grep backup)",
        )
    return _ok("backups", title, detail)


def run_checks(config_path: Path) -> list[Check]:
    first, config = check_config(config_path)
    if config is None:
        return [first]
    status, why = _daemon_status(config)
    return [
        first,
        check_daemon(config, status, why),
        check_port(config),
        check_board(config, status),
        check_broker(config, status),
        check_clock(),
        check_disk(config),
        check_journal(config),
        check_backups(config),
    ]


STATUS_PT = {"ok": "ok", "warn": "AVISO", "fail": "FALHA", "skip": "não testado"}


def print_checks(checks: list[Check]) -> None:
    for c in checks:
        print(f"[{STATUS_PT[c.status]:^11}] {c.title}: {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            print(f"{'':14}o que fazer: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    if failed:
        print(f"{failed} falha(s), {warned} aviso(s)")
    else:
        print(f"tudo certo ({warned} aviso(s))" if warned else "tudo certo")
