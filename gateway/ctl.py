"""``metalavctl``: the technician's CLI. It talks to the running daemon over its local
unix socket; text for people is in Portuguese (the store's technicians), ``--json``
output is for scripts.

    metalavctl status [--json]
    metalavctl execution KEY [--json]

The socket is found from ``--socket``, else ``--config`` (the daemon's config file),
else ``$METALAV_API__SOCKET``, else the packaged default. Exit status: 0 ok,
1 not found, 2 usage, 3 daemon unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from .config import ApiSection, ConfigError, load_config

__all__ = ["main"]

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

STATE_PT = {
    "accepted": "aceita",
    "dispatching": "enviando à placa",
    "released": "liberada",
    "failed": "falhou (compensar)",
    "rejected": "rejeitada",
    "expired": "expirada (compensar)",
    "needs_review": "revisão manual",
}


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        try:
            return load_config(Path(args.config)).api.socket
        except ConfigError as exc:
            raise CtlError(
                "configuração inválida:\n  " + "\n  ".join(exc.lines), EXIT_USAGE
            ) from None
    env = os.environ.get("METALAV_API__SOCKET")
    return Path(env) if env else ApiSection().socket


def _get(sock: Path, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://gateway", timeout=5.0) as client:
            return client.get(path)
    except httpx.TransportError:
        raise CtlError(
            f"o gateway não responde em {sock} — o serviço está rodando? "
            "(systemctl status metalav-gateway)",
            EXIT_UNREACHABLE,
        ) from None


def _when(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts).strftime("%d/%m/%Y %H:%M:%S")


def _print_status(s: dict[str, Any]) -> None:
    d, b, m = s["daemon"], s["broker"], s["board"]
    print(f"Loja {d['store_id'] or '-'} · gateway {d['gateway_id']} · versão {d['version']}")
    print(f"  daemon:  em execução (pid {d['pid']}, desde {_when(d['started_at'])})")
    broker = "conectado" if b["connected"] else "DESCONECTADO"
    print(f"  broker:  {broker} ({b['host']}:{b['port']}, desde {_when(b['since'])})")
    if m["connected"]:
        print(f"  placa:   conectada em {m['port']} (boot id {m['boot_id']})")
    else:
        print(f"  placa:   DESCONECTADA em {m['port']} ({m['last_error'] or 'sem resposta'})")
    counts = s["executions"]
    print("  execuções por estado:" + ("" if counts else " nenhuma"))
    for state, n in sorted(counts.items()):
        print(f"    {STATE_PT.get(state, state):<22} {n}")
    print(f"  fila de envio (outbox): {s['outbox_depth']} pendente(s)")
    if s["rejected_unauthenticated"]:
        print(f"  comandos não autenticados rejeitados: {s['rejected_unauthenticated']}")


def _print_execution(e: dict[str, Any]) -> None:
    print(f"Execução {e['execute_key']}")
    print(
        f"  estado:    {STATE_PT.get(e['state'], e['state'])}"
        + (f" ({e['reason']})" if e["reason"] else "")
    )
    print(f"  pagamento: {e['payment_id']}   máquina: {e['machine_id']}   ciclo: {e['cycle']}")
    print(f"  recebida:  {e['received_at']}   atualizada: {e['updated_at']}")
    print("  histórico:")
    for h in e["history"]:
        extra = " ".join(x for x in (h["reason"], h["detail"]) if x)
        print(f"    {h['at']}  {h['state']:<13} {extra}")
    print("  eventos para a nuvem:")
    for o in e["outbox"]:
        err = f" erro: {o['last_error']}" if o["last_error"] else ""
        print(f"    #{o['id']} {o['state']} (tentativas {o['attempts']}){err}")


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="unix socket of the daemon's local API")
    common.add_argument("--config", help="the daemon's config file (to find the socket)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    parser = argparse.ArgumentParser(
        prog="metalavctl", description="Meta-Lav gateway: technician CLI"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="daemon, links, executions, outbox")
    ex = sub.add_parser("execution", parents=[common], help="one execution's whole history")
    ex.add_argument("key", help="the execute_key")
    args = parser.parse_args(argv)

    try:
        sock = _socket_path(args)
        if args.command == "status":
            resp = _get(sock, "/v1/status")
            data = resp.json()
            if args.json:
                print(json.dumps(data, indent=2, ensure_ascii=False))
            else:
                _print_status(data)
            return 0
        resp = _get(sock, f"/v1/executions/{quote(args.key, safe='')}")
        if resp.status_code == 404:
            if args.json:
                print(json.dumps(resp.json()))
            raise CtlError(f"execução {args.key!r} não encontrada no diário", EXIT_NOT_FOUND)
        data = resp.json()
        if args.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            _print_execution(data)
        return 0
    except CtlError as exc:
        print(f"metalavctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
