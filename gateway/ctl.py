"""``metalavctl``: the technician's command line, talking to the running daemon.

``metalavctl``: the technician's CLI. It talks to the running daemon over its local
unix socket; text for people is in Portuguese (the store's technicians), ``--json``
output is for scripts.

    metalavctl status [--json]
    metalavctl execution KEY | --payment ID [--json]
    metalavctl executions [--state S] [--machine M] [--since T] [--until T] [--limit N]
                [--offset N]
    metalavctl resolve KEY --decision released|not_released --reason TEXT [--by NAME]
    metalavctl reprocess KEY --reason TEXT [--by NAME]
    metalavctl store pause|resume --reason TEXT [--by NAME]
    metalavctl log [--since T] [--limit N]
    metalavctl machines [--json]
    metalavctl relay test MACHINE --reason TEXT [--cycle C] [--by NAME]
    metalavctl machine out-of-service|in-service MACHINE --reason TEXT [--by NAME]
    metalavctl audit [--provider-ref REF | --idempotency-key K] [--json]
    metalavctl breakers [--json] | breakers reset NAME --reason TEXT
    metalavctl dlq list [--archived] | dlq show ID | dlq retry ID|--all [--limit N]
                --reason TEXT
                | dlq archive ID --reason TEXT
    metalavctl reconcile --since DATE [--json]
    metalavctl cleanup --days N --reason TEXT

The socket is found from ``--socket``, else ``--config`` (the daemon's config file),
else ``$METALAV_API__SOCKET``, else the packaged default. Exit status: 0 ok,
1 not found, 2 usage, 3 daemon unreachable, 4 refused (e.g. machine busy). With
``--json`` every error is one JSON object on stdout: ``{"error": CODE, "message": TEXT}``.
Dates are shown in the local time of the machine running metalavctl; dates given
without a zone (``--since 2026-11-01``) are local time too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

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
    def __init__(self, message: str, code: int, error: str = "error") -> None:
        super().__init__(message)
        self.code = code
        self.error = error


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (JSON with ``--json``), exit 2."""

    def error(self, message: str) -> NoReturn:
        raise CtlError(f"{message} (veja: {self.prog} --help)", EXIT_USAGE, "usage")


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
    except httpx.TransportError as exc:
        if _caused_by(exc, PermissionError):
            raise CtlError(
                f"sem permissão para usar {sock} — sua conta precisa estar no grupo do"
                " socket (metalav-tech)",
                EXIT_UNREACHABLE,
                "permission_denied",
            ) from None
        raise CtlError(
            f"o gateway não responde em {sock} — o serviço está rodando? "
            "(systemctl status metalav-gateway)",
            EXIT_UNREACHABLE,
            "unreachable",
        ) from None
    try:
        data = resp.json()
    except ValueError:
        raise CtlError(f"resposta inválida do gateway (HTTP {resp.status_code})", 1) from None
    if resp.status_code >= 400:
        message = data.get("message") or data.get("error") or f"HTTP {resp.status_code}"
        code = EXIT_NOT_FOUND if resp.status_code == 404 else EXIT_REFUSED
        if resp.status_code == 400:
            code = EXIT_USAGE
        raise CtlError(message, code, str(data.get("error") or "error"))
    return data


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _local(iso: str | None) -> str:
    """A journal time (RFC 3339 UTC) in this machine's local time, as a technician
    reads a clock."""
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%d/%m/%Y %H:%M:%S")
    except ValueError:
        return iso


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
    store = s.get("store") or {}
    if store.get("paused"):
        print(
            f"  LOJA PAUSADA desde {_local(store['since'])} por {store['by']}: "
            f"{store['reason']} — novos comandos são recusados (metalavctl store resume)"
        )
    if store.get("config_version"):
        print(f"  versão da configuração: {store['config_version']}")


def _print_execution(e: dict[str, Any]) -> None:
    print(f"Execução {e['execute_key']}")
    print(
        f"  estado:    {STATE_PT.get(e['state'], e['state'])}"
        + (f" ({e['reason']})" if e["reason"] else "")
    )
    print(f"  pagamento: {e['payment_id']}   máquina: {e['machine_id']}   ciclo: {e['cycle']}")
    print(f"  recebida:  {_local(e['received_at'])}   atualizada: {_local(e['updated_at'])}")
    print("  histórico:")
    for h in e["history"]:
        extra = " ".join(x for x in (h["reason"], h["detail"]) if x)
        print(f"    {_local(h['at'])}  {STATE_PT.get(h['state'], h['state']):<24} {extra}")
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
                f"       fora de serviço desde {_local(oos['set_at'])} por {oos['set_by']}:"
                f" {oos['reason']}"
            )
        last = m["last_execution"]
        if last:
            print(
                f"       último ciclo: {last['execute_key']} {last['cycle']} "
                f"{STATE_PT.get(last['state'], last['state'])} ({_local(last['updated_at'])})"
            )
        for alert in m["recent_alerts"][:3]:
            print(f"       alerta {_local(alert['at'])} {alert['code']}: {alert['detail'] or ''}")


def _print_audit(data: dict[str, Any]) -> None:
    for e in data["entries"]:
        print(
            f"{_local(e['at'])}  {e['actor']} ({e['os_user']})  {e['action']} {e['target']}  "
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


def _print_executions(data: dict[str, Any]) -> None:
    rows = data["executions"]
    if not rows:
        print("nenhuma execução encontrada")
    for r in rows:
        print(
            f"{_local(r['received_at'])}  {r['execute_key']:<28} pagamento {r['payment_id']:<20}"
            f" {r['machine_id']:<6} {STATE_PT.get(r['state'], r['state'])}"
            + (f" ({r['reason']})" if r["reason"] else "")
        )
    shown = data.get("offset", 0) + len(rows)
    if "total" in data and data["total"] > shown:
        print(f"... {data['total'] - shown} mais (use --offset {shown})")


def _print_payment_audit(data: dict[str, Any]) -> None:
    ref = data["provider_ref"] or data["idempotency_key"]
    executions = data["executions"]
    print(
        f"Pagamento {ref}: {len(executions)} execução(ões), "
        f"{data['actuations']} acionamento(s) confirmado(s) pela placa"
    )
    if data["actuations"] > 1:
        print("  ATENÇÃO: mais de um acionamento físico para o mesmo pagamento")
    for e in executions:
        print(
            f"  {e['execute_key']}  pagamento {e['payment_id']}  máquina {e['machine_id']}  "
            f"{STATE_PT.get(e['state'], e['state'])}  recebida {_local(e['received_at'])}"
        )
        for a in e["actuations"]:
            print(f"    acionamento: {_local(a['at'])} {a['reason'] or ''}")
        for r in e["results"]:
            comp = " compensação" if r.get("compensation") else ""
            print(
                f"    resultado #{r['seq']} {r['state']}{comp}: {r['outbox_state']}"
                f" (enviado {_local(r['sent_at'])})"
            )


def _print_log(data: dict[str, Any]) -> None:
    if not data["entries"]:
        print("registro de operações vazio")
    for e in data["entries"]:
        print(
            f"{_local(e['at'])}  {e['actor']} ({e['os_user']})  {e['action']} {e['target']}"
            f"  {e['outcome']}" + (f"  decisão: {e['decision']}" if e.get("decision") else "")
        )
        print(f"    motivo: {e['reason']}   configuração: {e.get('config_version') or '-'}")
        if e.get("before") is not None or e.get("after") is not None:
            before = json.dumps(e.get("before"), ensure_ascii=False)
            after = json.dumps(e.get("after"), ensure_ascii=False)
            print(f"    antes: {before}  depois: {after}")


def _print_reprocess(d: dict[str, Any]) -> None:
    key = d["execute_key"]
    if d["action"] == "redispatched":
        print(
            f"{key}: a placa recusou antes ({d['previous']}), nada foi acionado; "
            f"enviada de novo (acompanhe: metalavctl execution {key})"
        )
        return
    state = STATE_PT.get(d["state"], d["state"])
    print(f"{key}: {state}; resultado reenviado à nuvem (nenhum acionamento novo)")
    if d.get("waiting") == "waiting_for_board":
        print("  ainda não foi à placa: sai sozinha quando a placa responder (ou expira)")
    if d["state"] == ExecutionState.NEEDS_REVIEW:
        print("  revisão manual: confira a máquina e use metalavctl resolve")
    if d.get("dead_events_retried"):
        print(f"  {len(d['dead_events_retried'])} evento(s) da DLQ de volta à fila de envio")


def _build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--socket", help="unix socket of the daemon's local API")
    common.add_argument("--config", help="the daemon's config file (to find the socket)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    action = _Parser(add_help=False, parents=[common])
    action.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    action.add_argument("--by", help="technician's name (default: your OS account)")

    parser = _Parser(prog="metalavctl", description="Meta-Lav gateway: technician CLI")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("status", parents=[common], help="daemon, links, executions, outbox")
    ex = sub.add_parser("execution", parents=[common], help="one execution's whole history")
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("key", nargs="?", help="the execute_key")
    which.add_argument("--payment", help="every execution of this payment_id")
    exs = sub.add_parser("executions", parents=[common], help="list executions (newest first)")
    exs.add_argument("--state", help="only this state (e.g. needs_review)")
    exs.add_argument("--machine", help="only this machine")
    exs.add_argument("--since", help="received at or after (AAAA-MM-DD[THH:MM], local time)")
    exs.add_argument("--until", help="received before (AAAA-MM-DD[THH:MM], local time)")
    exs.add_argument("--limit", type=int, default=50, help="page size (1..1000)")
    exs.add_argument("--offset", type=int, default=0, help="skip this many")
    sub.add_parser("machines", parents=[common], help="machines: state, last cycle, alerts")
    aud = sub.add_parser(
        "audit", parents=[common], help="operator actions; or a payment's whole trail"
    )
    ref = aud.add_mutually_exclusive_group()
    ref.add_argument("--provider-ref", help="every execution, actuation and result of it")
    ref.add_argument("--idempotency-key", help="every execution, actuation and result of it")
    log = sub.add_parser("log", parents=[common], help="the operation record (newest first)")
    log.add_argument("--since", help="from this date (AAAA-MM-DD[THH:MM], local time)")
    log.add_argument("--limit", type=int, default=50, help="how many (1..1000)")

    res = sub.add_parser(
        "resolve", parents=[action], help="end a needs_review execution (never pulses)"
    )
    res.add_argument("key", help="the execute_key")
    res.add_argument(
        "--decision",
        required=True,
        choices=("released", "not_released"),
        help="what the technician saw at the machine",
    )
    rep = sub.add_parser(
        "reprocess", parents=[action], help="re-send the result; re-dispatch only what never ran"
    )
    rep.add_argument("key", help="the execute_key")
    store = sub.add_parser("store", help="the whole store").add_subparsers(
        dest="sub", required=True
    )
    store.add_parser("pause", parents=[action], help="refuse new paid releases (compensated)")
    store.add_parser("resume", parents=[action], help="take paid releases again")

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
    retry.add_argument("--limit", type=int, help="with --all: at most this many (oldest first)")
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
    if cmd == "execution" and args.payment is not None:
        data = _request(sock, "GET", f"/v1/payments/{q(args.payment)}/executions")
        return data, _print_executions
    if cmd == "execution":
        return _request(sock, "GET", f"/v1/executions/{q(args.key)}"), _print_execution
    if cmd == "executions":
        query = urlencode(
            {
                k: v
                for k, v in (
                    ("state", args.state),
                    ("machine", args.machine),
                    ("since", args.since),
                    ("until", args.until),
                    ("limit", args.limit),
                    ("offset", args.offset),
                )
                if v is not None
            }
        )
        return _request(sock, "GET", f"/v1/executions?{query}"), _print_executions
    if cmd == "machines":
        return _request(sock, "GET", "/v1/machines"), _print_machines
    if cmd == "audit" and (args.provider_ref is not None or args.idempotency_key is not None):
        field = "provider_ref" if args.provider_ref is not None else "idempotency_key"
        value = args.provider_ref if args.provider_ref is not None else args.idempotency_key
        query = urlencode({field: value})
        return _request(sock, "GET", f"/v1/payment-audit?{query}"), _print_payment_audit
    if cmd == "audit":
        return _request(sock, "GET", "/v1/audit"), _print_audit
    if cmd == "log":
        query = urlencode({"limit": args.limit, **({"since": args.since} if args.since else {})})
        return _request(sock, "GET", f"/v1/log?{query}"), _print_log
    if cmd == "resolve":
        data = _request(
            sock,
            "POST",
            f"/v1/executions/{q(args.key)}/resolve",
            act({"decision": args.decision}),
        )
        return data, lambda d: print(
            f"{d['execute_key']}: {STATE_PT.get(d['state'], d['state'])} ({d['reason']});"
            " resultado enviado à nuvem" + ("" if d["state"] == "released" else ", com compensação")
        )
    if cmd == "reprocess":
        data = _request(sock, "POST", f"/v1/executions/{q(args.key)}/reprocess", act({}))
        return data, _print_reprocess
    if cmd == "store":
        data = _request(sock, "POST", f"/v1/store/{sub}", act({}))
        return data, lambda d: print(
            ("Loja PAUSADA: novos comandos são recusados" if d["paused"] else "Loja retomada")
            + ("" if d["changed"] else " (já estava)")
        )
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
        if args.limit is not None and not args.all:
            raise CtlError("--limit só vale com --all", EXIT_USAGE, "usage")
        body = act({"all": True, "limit": args.limit} if args.all else {"ids": [args.id]})
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
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    try:
        args = _build_parser().parse_args(argv)
        sock = _socket_path(args)
        data, printer = _run(args, sock)
        if args.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            printer(data)
        return 0
    except CtlError as exc:
        if as_json:
            error = "not_found" if exc.code == EXIT_NOT_FOUND else exc.error
            print(json.dumps({"error": error, "message": str(exc)}, ensure_ascii=False))
        print(f"metalavctl: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
