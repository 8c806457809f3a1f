"""``metalavctl``: the technician's command line, talking to the running daemon.

``metalavctl``: the technician's CLI. It talks to the running daemon over its local
unix socket; text for people is in Portuguese (the store's technicians), ``--json``
output is for scripts.

    metalavctl status [--json]
    metalavctl execution KEY [--json]
    metalavctl machines [--json]
    metalavctl relay test MACHINE --reason TEXT [--cycle C] [--by NAME]
    metalavctl machine out-of-service|in-service MACHINE --reason TEXT [--by NAME]
    metalavctl audit [--json]
    metalavctl breakers [--json] | breakers reset NAME --reason TEXT
    metalavctl dlq list [--archived] | dlq show ID | dlq retry ID|--all --reason TEXT
                | dlq archive ID --reason TEXT
    metalavctl reconcile --since DATE [--json]
    metalavctl cleanup --days N --reason TEXT

The socket is found from ``--socket``, else ``--config`` (the daemon's config file),
else ``$METALAV_API__SOCKET``, else the packaged default. Exit status: 0 ok,
1 not found, 2 usage, 3 daemon unreachable, 4 refused (e.g. machine busy).
``status`` exits with the health level instead, as a monitoring check would: 0 normal,
1 alert, 2 critical (3 daemon unreachable).
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
from .lifecycle import ExecutionState

__all__ = ["main"]

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4

MACHINE_STATE_PT = {
    "free": "livre",
    "releasing": "liberando / aguardando início",
    "running": "em ciclo",
    "out_of_service": "FORA DE SERVIÇO",
}

#: What a technician reads for each execution state (a test checks that none is missing).
STATE_PT: dict[ExecutionState, str] = {
    ExecutionState.ACCEPTED: "aceita",
    ExecutionState.DISPATCHING: "enviando à placa",
    ExecutionState.RELEASED: "liberada",
    ExecutionState.STARTED: "em ciclo",
    ExecutionState.NOT_STARTED: "não iniciou (compensar)",
    ExecutionState.COMPLETED: "concluída",
    ExecutionState.FAILED: "falhou (compensar)",
    ExecutionState.REJECTED: "rejeitada",
    ExecutionState.EXPIRED: "expirada (compensar)",
    ExecutionState.NEEDS_REVIEW: "revisão manual",
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


def _request(sock: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the daemon; return the JSON body, or raise CtlError with its message."""
    transport = httpx.HTTPTransport(uds=str(sock))
    try:
        with httpx.Client(transport=transport, base_url="http://gateway", timeout=10.0) as client:
            resp = client.request(method, path, json=body)
    except httpx.TransportError:
        raise CtlError(
            f"o gateway não responde em {sock} — o serviço está rodando? "
            "(systemctl status metalav-gateway)",
            EXIT_UNREACHABLE,
        ) from None
    try:
        data = resp.json()
    except ValueError:
        raise CtlError(f"resposta inválida do gateway (HTTP {resp.status_code})", 1) from None
    if resp.status_code >= 400:
        message = data.get("message") or data.get("error") or f"HTTP {resp.status_code}"
        code = EXIT_NOT_FOUND if resp.status_code == 404 else EXIT_REFUSED
        raise CtlError(message, code)
    return data


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
    j = s.get("journal") or {}
    if j.get("writable", True):
        print(f"  diário:  gravando ({j.get('path', '-')})")
    else:
        print(
            f"  diário:  NÃO GRAVÁVEL desde {_when(j['since'])}: {j['error']} — nenhum"
            " comando é aceito nem liberado até voltar (veja o espaço em disco: df -h)"
        )
    counts = s["executions"]
    print("  execuções por estado:" + ("" if counts else " nenhuma"))
    for state, n in sorted(counts.items()):
        print(f"    {STATE_PT.get(state, state):<22} {n}")
    level = {"normal": "", "warning": " — ALERTA", "critical": " — CRÍTICO"}
    outbox = s.get("outbox", {})
    print(
        f"  fila de envio (outbox): {s['outbox_depth']} pendente(s)"
        f"{level.get(outbox.get('level', 'normal'), '')}"
    )
    if outbox.get("dlq"):
        print(f"  fila de mortos (DLQ): {outbox['dlq']} evento(s) — veja metalavctl dlq list")
    opened = [b["name"] for b in s.get("breakers", []) if b["state"] != "closed"]
    if opened:
        print(f"  disjuntores abertos: {', '.join(opened)} — veja metalavctl breakers")
    if s["rejected_unauthenticated"]:
        print(f"  comandos não autenticados rejeitados: {s['rejected_unauthenticated']}")
    by_reason = s.get("rejections_by_reason") or {}
    timed = sum(n for r, n in by_reason.items() if r in ("not_yet_valid", "stale_command"))
    if timed:
        print(f"    dos quais por horário (relógio do gateway ou da nuvem): {timed}")
    _print_health(s.get("health"))


#: Health levels (gateway/health.py) for people, and as ``status``'s exit status.
HEALTH_PT = {"normal": "normal", "alert": "ALERTA", "critical": "CRÍTICO"}
HEALTH_EXIT = {"normal": 0, "alert": 1, "critical": 2}
CHECK_PT = {
    "journal": "diário (latência de gravação, ms)",
    "board_link": "placa",
    "broker_link": "broker",
    "https": "HTTPS da nuvem",
    "outbox_depth": "fila de envio",
    "outbox_oldest_age_s": "evento mais antigo na fila (s)",
    "dlq": "fila de mortos (DLQ)",
    "breakers": "disjuntores",
    "clock": "relógio",
    "disk_free_mb": "disco livre (MB)",
}


def _pt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "sim" if value else "não"
    return str(value)


def _print_health(h: dict[str, Any] | None) -> None:
    if not h:
        return
    print(f"  saúde: {HEALTH_PT.get(h['level'], h['level'])}")
    for name, c in h["checks"].items():
        value = c["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_pt(v)}" for k, v in value.items())
        else:
            value = _pt(value)
        detail = f" ({c['detail']})" if c.get("detail") else ""
        level = HEALTH_PT.get(c["level"], c["level"])
        print(f"    {CHECK_PT.get(name, name):<34} {level:<8} {value}{detail}")


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


def _print_machines(data: dict[str, Any]) -> None:
    for m in data["machines"]:
        kind = "lavadora" if m["kind"] == "washer" else "secadora"
        flags = " RELÉ TRAVADO" if m["stuck_relay"] else ""
        print(
            f"{m['id']:<6} {m['label'] or kind:<16} canal {m['channel']:<3} "
            f"{MACHINE_STATE_PT.get(m['state'], m['state'])}{flags}"
        )
        oos = m["out_of_service"]
        if oos:
            print(
                f"       fora de serviço desde {oos['set_at']} por {oos['set_by']}: {oos['reason']}"
            )
        last = m["last_execution"]
        if last:
            print(
                f"       último ciclo: {last['execute_key']} {last['cycle']} "
                f"{STATE_PT.get(last['state'], last['state'])} ({last['updated_at']})"
            )
        for alert in m["recent_alerts"][:3]:
            print(f"       alerta {alert['at']} {alert['code']}: {alert['detail'] or ''}")


def _print_audit(data: dict[str, Any]) -> None:
    for e in data["entries"]:
        print(
            f"{e['at']}  {e['actor']} ({e['os_user']})  {e['action']} {e['target']}  "
            f"{e['outcome']}  motivo: {e['reason']}"
        )


def _print_breakers(data: dict[str, Any]) -> None:
    state_pt = {"closed": "fechado (ok)", "open": "ABERTO", "half_open": "meio-aberto (testando)"}
    for b in data["breakers"]:
        extra = f", falhas {b['failures']}" if b["failures"] else ""
        print(f"{b['name']:<20} {state_pt.get(b['state'], b['state'])}{extra}")


def _print_dlq(data: dict[str, Any]) -> None:
    if not data["items"]:
        print("fila de mortos (DLQ) vazia")
    for i in data["items"]:
        print(
            f"#{i['id']:<6} {i['state']:<8} {i['topic']:<12} {i['stream']:<28} "
            f"tentativas {i['attempts']}  {i['last_error'] or ''}"
        )


def _print_reconcile(data: dict[str, Any]) -> None:
    print(f"Desde {data['since']}")
    print(
        f"Execuções com eventos ainda não confirmados pela nuvem: {len(data['not_acknowledged'])}"
    )
    for r in data["not_acknowledged"]:
        print(
            f"  {r['execute_key']:<28} pagamento {r['payment_id']:<20} {r['state']:<13} "
            f"{r['events_not_acked']} evento(s) {r['outbox_states']}"
        )
    print(f"Execuções aguardando compensação ou revisão: {len(data['awaiting_compensation'])}")
    for r in data["awaiting_compensation"]:
        print(
            f"  {r['execute_key']:<28} pagamento {r['payment_id']:<20} "
            f"{STATE_PT.get(r['state'], r['state']):<24} compensação: "
            f"{r['compensation_event'] or 'técnico decide'}"
        )


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="unix socket of the daemon's local API")
    common.add_argument("--config", help="the daemon's config file (to find the socket)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    action = argparse.ArgumentParser(add_help=False, parents=[common])
    action.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    action.add_argument("--by", help="technician's name (default: your OS account)")

    parser = argparse.ArgumentParser(
        prog="metalavctl", description="Meta-Lav gateway: technician CLI"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="daemon, links, executions, outbox")
    ex = sub.add_parser("execution", parents=[common], help="one execution's whole history")
    ex.add_argument("key", help="the execute_key")
    sub.add_parser("machines", parents=[common], help="machines: state, last cycle, alerts")
    sub.add_parser("audit", parents=[common], help="recent operator actions")

    relay = sub.add_parser("relay", help="relay actions").add_subparsers(dest="sub", required=True)
    test = relay.add_parser("test", parents=[action], help="a technical-service test turn")
    test.add_argument("machine")
    test.add_argument("--cycle", help="cycle program to run (default: the machine's first)")

    machine = sub.add_parser("machine", help="machine actions")
    machine_sub = machine.add_subparsers(dest="sub", required=True)
    for name, text in (
        ("out-of-service", "take a machine out of service"),
        ("in-service", "put a machine back in service"),
    ):
        machine_sub.add_parser(name, parents=[action], help=text).add_argument("machine")

    breakers = sub.add_parser("breakers", parents=[common], help="circuit breakers")
    breakers_sub = breakers.add_subparsers(dest="sub")
    breakers_sub.add_parser("reset", parents=[action], help="close a breaker").add_argument("name")

    dlq = sub.add_parser("dlq", help="dead-letter queue").add_subparsers(dest="sub", required=True)
    dlq.add_parser("list", parents=[common], help="dead events").add_argument(
        "--archived", action="store_true", help="include archived ones"
    )
    dlq.add_parser("show", parents=[common], help="one event and its attempts").add_argument(
        "id", type=int
    )
    retry = dlq.add_parser("retry", parents=[action], help="send dead events again")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", type=int, nargs="?")
    target.add_argument("--all", action="store_true")
    dlq.add_parser("archive", parents=[action], help="keep, never send").add_argument(
        "id", type=int
    )

    rec = sub.add_parser("reconcile", parents=[common], help="what the cloud still lacks")
    rec.add_argument("--since", required=True, help="date (AAAA-MM-DD or ISO 8601)")
    clean = sub.add_parser("cleanup", parents=[action], help="prune old, acknowledged data")
    clean.add_argument("--days", type=int, required=True)
    return parser


def _run(args: argparse.Namespace, sock: Path) -> tuple[Any, Any]:
    """Call the daemon for one command: (its JSON answer, how to print it for people)."""

    def act(extra: dict[str, Any]) -> dict[str, Any]:
        return {"reason": args.reason, "actor": args.by, **extra}

    def q(text: object) -> str:
        return quote(str(text), safe="")

    cmd, sub = args.command, getattr(args, "sub", None)
    if cmd == "status":
        return _request(sock, "GET", "/v1/status"), _print_status
    if cmd == "execution":
        return _request(sock, "GET", f"/v1/executions/{q(args.key)}"), _print_execution
    if cmd == "machines":
        return _request(sock, "GET", "/v1/machines"), _print_machines
    if cmd == "audit":
        return _request(sock, "GET", "/v1/audit"), _print_audit
    if cmd == "relay":
        data = _request(
            sock, "POST", f"/v1/machines/{q(args.machine)}/relay-test", act({"cycle": args.cycle})
        )
        return data, lambda d: print(
            f"teste de relé enviado: {d['execute_key']} "
            f"(acompanhe com: metalavctl execution {d['execute_key']})"
        )
    if cmd == "machine":
        value = sub == "out-of-service"
        data = _request(
            sock, "POST", f"/v1/machines/{q(args.machine)}/service", act({"out_of_service": value})
        )
        return data, lambda d: print(
            f"máquina {args.machine}: "
            + ("fora de serviço" if value else "em serviço")
            + ("" if d["changed"] else " (já estava)")
        )
    if cmd == "breakers" and sub == "reset":
        data = _request(sock, "POST", f"/v1/breakers/{q(args.name)}/reset", act({}))
        return data, lambda d: print(f"disjuntor {d['reset']} fechado")
    if cmd == "breakers":
        return _request(sock, "GET", "/v1/breakers"), _print_breakers
    if cmd == "dlq" and sub == "list":
        archived = "?archived=1" if args.archived else ""
        return _request(sock, "GET", f"/v1/dlq{archived}"), _print_dlq
    if cmd == "dlq" and sub == "show":
        return _request(sock, "GET", f"/v1/dlq/{args.id}"), lambda d: print(
            json.dumps(d, indent=2, ensure_ascii=False)
        )
    if cmd == "dlq" and sub == "retry":
        body = act({"all": True} if args.all else {"ids": [args.id]})
        data = _request(sock, "POST", "/v1/dlq/retry", body)
        return data, lambda d: print(f"{len(d['retried'])} evento(s) de volta à fila de envio")
    if cmd == "dlq":
        data = _request(sock, "POST", f"/v1/dlq/{args.id}/archive", act({}))
        return data, lambda d: print(f"evento #{d['archived']} arquivado (mantido, não enviado)")
    if cmd == "reconcile":
        return _request(sock, "GET", f"/v1/reconcile?since={q(args.since)}"), _print_reconcile
    data = _request(sock, "POST", "/v1/cleanup", act({"days": args.days}))
    return data, lambda d: print(
        f"removidos: {d['removed']['executions']} execução(ões), "
        f"{d['removed']['outbox_events']} evento(s) já confirmados"
    )


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        sock = _socket_path(args)
        try:
            data, printer = _run(args, sock)
        except CtlError as exc:
            if exc.code == EXIT_NOT_FOUND and args.json:
                print(json.dumps({"error": "not_found", "message": str(exc)}))
            raise
        if args.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            printer(data)
        if args.command == "status":
            return HEALTH_EXIT.get((data.get("health") or {}).get("level", "normal"), 0)
        return 0
    except CtlError as exc:
        print(f"metalavctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
