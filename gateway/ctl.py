"""``metalavctl``: the technician's command line, talking to the running daemon.

It talks to the running daemon over its local unix socket. Text for people follows
the technician's language (gateway/i18n.py: pt_BR when ``LANGUAGE`` / ``LC_ALL`` /
``LANG`` says so, English otherwise): help, argparse's errors, states, table headings
and the daemon's own messages. ``--json`` output is for scripts and never translated
(codes and states are the contract's).

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
                --reason TEXT | dlq archive ID --reason TEXT
    metalavctl reconcile --since DATE [--json]
    metalavctl cleanup --days N --reason TEXT
    metalavctl doctor | backup PATH | restore PATH --reason TEXT   (gateway/ctl_kit.py)

The socket is found from ``--socket``, else ``--config`` (the daemon's config file),
else ``$METALAV_API__SOCKET``, else the packaged default. Exit status: 0 ok,
1 not found, 2 usage (bad arguments, bad dates), 3 daemon unreachable (or the socket
refuses this account), 4 refused (e.g. machine busy). ``status`` exits with the health
level instead, as a monitoring check would: 0 normal, 1 alert, 2 critical (3 daemon
unreachable). With ``--json`` every error is one JSON object on stdout,
``{"error": CODE, "message": TEXT}``, besides the line on stderr. Dates are shown in the
local time of the machine running metalavctl; dates given without a zone
(``--since 2026-11-01``) are local time too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import httpx

from . import ctl_kit
from .config import ApiSection, ConfigError, load_config
from .i18n import N_, cli_translation, language_of
from .lifecycle import ExecutionState

__all__ = ["STATE_TEXT", "main", "state_name"]

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4

_translation = cli_translation()
_ = _translation.gettext

MACHINE_STATE_TEXT = {
    "free": N_("free"),
    "releasing": N_("releasing / waiting for start"),
    "running": N_("running"),
    "out_of_service": N_("OUT OF SERVICE"),
}

#: What a technician reads for each execution state (a test checks that none is
#: missing, and that the pt_BR catalog translates each).
STATE_TEXT: dict[ExecutionState, str] = {
    ExecutionState.ACCEPTED: N_("accepted"),
    ExecutionState.DISPATCHING: N_("sending to the board"),
    ExecutionState.RELEASED: N_("released"),
    ExecutionState.STARTED: N_("running"),
    ExecutionState.NOT_STARTED: N_("did not start (compensate)"),
    ExecutionState.COMPLETED: N_("completed"),
    ExecutionState.FAILED: N_("failed (compensate)"),
    ExecutionState.REJECTED: N_("rejected"),
    ExecutionState.EXPIRED: N_("expired (compensate)"),
    ExecutionState.NEEDS_REVIEW: N_("manual review"),
}

BREAKER_TEXT = {
    "closed": N_("closed (ok)"),
    "open": N_("OPEN"),
    "half_open": N_("half-open (probing)"),
}


def state_name(state: str) -> str:
    """An execution state as the technician reads it."""
    text = STATE_TEXT.get(state)  # type: ignore[call-overload]
    return _(text) if text else state


class CtlError(Exception):
    def __init__(self, message: str, code: int, error: str = "error") -> None:
        super().__init__(message)
        self.code = code
        self.error = error


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (JSON with ``--json``), exit 2."""

    def error(self, message: str) -> NoReturn:
        hint = _("see: {prog} --help").format(prog=self.prog)
        raise CtlError(f"{message} ({hint})", EXIT_USAGE, "usage")


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        try:
            return load_config(Path(args.config)).api.socket
        except ConfigError as exc:
            raise CtlError(
                _("invalid configuration: {problems}").format(problems="; ".join(exc.lines)),
                EXIT_USAGE,
                "bad_config",
            ) from None
    env = os.environ.get("METALAV_API__SOCKET")
    return Path(env) if env else ApiSection().socket


def _request(sock: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the daemon; return the JSON body, or raise CtlError with its message."""
    transport = httpx.HTTPTransport(uds=str(sock))
    headers = {"Accept-Language": language_of(_translation)}
    try:
        with httpx.Client(
            transport=transport, base_url="http://gateway", timeout=10.0, headers=headers
        ) as client:
            resp = client.request(method, path, json=body)
    except httpx.TransportError as exc:
        if _caused_by(exc, PermissionError):
            raise CtlError(
                _(
                    "no permission to use {socket}: your account must be in the socket's"
                    " group (metalav-tech)"
                ).format(socket=sock),
                EXIT_UNREACHABLE,
                "permission_denied",
            ) from None
        raise CtlError(
            _(
                "the gateway does not answer at {socket}: is the service running?"
                " (systemctl status metalav-gateway)"
            ).format(socket=sock),
            EXIT_UNREACHABLE,
            "unreachable",
        ) from None
    try:
        data = resp.json()
    except ValueError:
        raise CtlError(
            _("invalid answer from the gateway (HTTP {status})").format(status=resp.status_code),
            1,
        ) from None
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


def _zoned(text: str | None) -> str | None:
    """A date or time as typed, with this machine's zone when it has none (the
    technician means the clock on the wall); what does not parse goes as typed, for
    the daemon to refuse with its message."""
    if not text:
        return text
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return text
    return parsed.isoformat() if parsed.tzinfo else parsed.astimezone().isoformat()


def _time_format() -> str:
    # The date layout is the language's: 28/11/2026 for pt_BR.
    return _("%Y-%m-%d %H:%M:%S")


def _local(iso: str | None) -> str:
    """A journal time (RFC 3339 UTC) in this machine's local time, as a technician
    reads a clock."""
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone().strftime(_time_format())
    except ValueError:
        return iso


def _when(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts).strftime(_time_format())


def _print_status(s: dict[str, Any]) -> None:
    d, b, m = s["daemon"], s["broker"], s["board"]
    print(
        _("Store {store} · gateway {gateway} · version {version}").format(
            store=d["store_id"] or "-", gateway=d["gateway_id"], version=d["version"]
        )
    )
    print(
        _("  daemon:  running (pid {pid}, since {since})").format(
            pid=d["pid"], since=_when(d["started_at"])
        )
    )
    broker = _("connected") if b["connected"] else _("DISCONNECTED")
    print(
        _("  broker:  {state} ({host}:{port}, since {since})").format(
            state=broker, host=b["host"], port=b["port"], since=_when(b["since"])
        )
    )
    if m["connected"]:
        print(
            _("  board:   connected on {port} (boot id {boot_id})").format(
                port=m["port"], boot_id=m["boot_id"]
            )
        )
    else:
        print(
            _("  board:   DISCONNECTED on {port} ({error})").format(
                port=m["port"], error=m["last_error"] or _("no answer")
            )
        )
    j = s.get("journal") or {}
    if j.get("writable", True):
        print(_("  journal: writing ({path})").format(path=j.get("path", "-")))
    else:
        print(
            _(
                "  journal: NOT WRITABLE since {since}: {error}; no command is accepted nor"
                " released until it is back (check the disk space: df -h)"
            ).format(since=_when(j["since"]), error=j["error"])
        )
    counts = s["executions"]
    print(_("  executions by state:") + ("" if counts else " " + _("none")))
    for state, n in sorted(counts.items()):
        print(f"    {state_name(state):<26} {n}")
    level = {"normal": "", "warning": " — " + _("WARNING"), "critical": " — " + _("CRITICAL")}
    outbox = s.get("outbox", {})
    print(
        _("  outbox: {count} waiting").format(count=s["outbox_depth"])
        + level.get(outbox.get("level", "normal"), "")
    )
    if outbox.get("dlq"):
        print(
            _("  dead-letter queue (DLQ): {count} event(s); see metalavctl dlq list").format(
                count=outbox["dlq"]
            )
        )
    opened = [b["name"] for b in s.get("breakers", []) if b["state"] != "closed"]
    if opened:
        print(
            _("  open breakers: {names}; see metalavctl breakers").format(names=", ".join(opened))
        )
    if s["rejected_unauthenticated"]:
        print(
            _("  unauthenticated commands rejected: {count}").format(
                count=s["rejected_unauthenticated"]
            )
        )
    store = s.get("store") or {}
    if store.get("paused"):
        print(
            _(
                "  STORE PAUSED since {since} by {by}: {reason}; new commands are refused"
                " (metalavctl store resume)"
            ).format(since=_local(store["since"]), by=store["by"], reason=store["reason"])
        )
    if store.get("config_version"):
        print(_("  config version: {version}").format(version=store["config_version"]))
    by_reason = s.get("rejections_by_reason") or {}
    timed = sum(n for r, n in by_reason.items() if r in ("not_yet_valid", "stale_command"))
    if timed:
        print(
            _("    of which for the time (the gateway's or the cloud's clock): {count}").format(
                count=timed
            )
        )
    _print_health(s.get("health"))


#: Health levels (gateway/health.py) for people, and as ``status``'s exit status.
HEALTH_NAMES = {"normal": N_("normal"), "alert": N_("ALERT"), "critical": N_("CRITICAL")}
HEALTH_EXIT = {"normal": 0, "alert": 1, "critical": 2}
CHECK_NAMES = {
    "journal": N_("journal (write latency, ms)"),
    "board_link": N_("board"),
    "broker_link": N_("broker"),
    "https": N_("cloud HTTPS"),
    "outbox_depth": N_("outbox"),
    "outbox_oldest_age_s": N_("oldest event in the outbox (s)"),
    "dlq": N_("dead-letter queue (DLQ)"),
    "breakers": N_("breakers"),
    "clock": N_("clock"),
    "disk_free_mb": N_("free disk (MB)"),
}


def _value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return _("yes") if value else _("no")
    return str(value)


def _level_name(level: str) -> str:
    return _(HEALTH_NAMES[level]) if level in HEALTH_NAMES else level


def _print_health(h: dict[str, Any] | None) -> None:
    if not h:
        return
    print(_("  health: {level}").format(level=_level_name(h["level"])))
    for name, c in h["checks"].items():
        value = c["value"]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_value_text(v)}" for k, v in value.items())
        else:
            value = _value_text(value)
        template = c.get("detail_template")
        text = _(template).format(**c.get("detail_params") or {}) if template else c.get("detail")
        detail = f" ({text})" if text else ""
        label = _(CHECK_NAMES[name]) if name in CHECK_NAMES else name
        print(f"    {label:<34} {_level_name(c['level']):<8} {value}{detail}")


def _print_execution(e: dict[str, Any]) -> None:
    print(_("Execution {key}").format(key=e["execute_key"]))
    print(
        _("  state:    {state}").format(state=state_name(e["state"]))
        + (f" ({e['reason']})" if e["reason"] else "")
    )
    print(
        _("  payment:  {payment}   machine: {machine}   cycle: {cycle}").format(
            payment=e["payment_id"], machine=e["machine_id"], cycle=e["cycle"]
        )
    )
    print(
        _("  received: {received}   updated: {updated}").format(
            received=_local(e["received_at"]), updated=_local(e["updated_at"])
        )
    )
    print(_("  history:"))
    for h in e["history"]:
        extra = " ".join(x for x in (h["reason"], h["detail"]) if x)
        print(f"    {_local(h['at'])}  {state_name(h['state']):<26} {extra}")
    print(_("  events to the cloud:"))
    for o in e["outbox"]:
        err = " " + _("error: {error}").format(error=o["last_error"]) if o["last_error"] else ""
        attempts = _("attempts {count}").format(count=o["attempts"])
        print(f"    #{o['id']} {o['state']} ({attempts}){err}")


def _print_machines(data: dict[str, Any]) -> None:
    for m in data["machines"]:
        kind = _("washer") if m["kind"] == "washer" else _("dryer")
        flags = " " + _("RELAY STUCK") if m["stuck_relay"] else ""
        state = MACHINE_STATE_TEXT.get(m["state"])
        print(
            f"{m['id']:<6} {m['label'] or kind:<16} "
            + _("channel {channel}").format(channel=m["channel"]).ljust(11)
            + f" {_(state) if state else m['state']}{flags}"
        )
        oos = m["out_of_service"]
        if oos:
            print(
                "       "
                + _("out of service since {since} by {by}: {reason}").format(
                    since=_local(oos["set_at"]), by=oos["set_by"], reason=oos["reason"]
                )
            )
        last = m["last_execution"]
        if last:
            print(
                "       "
                + _("last cycle: {key} {cycle} {state} ({at})").format(
                    key=last["execute_key"],
                    cycle=last["cycle"],
                    state=state_name(last["state"]),
                    at=_local(last["updated_at"]),
                )
            )
        for alert in m["recent_alerts"][:3]:
            print(
                "       "
                + _("alert {at} {code}: {detail}").format(
                    at=_local(alert["at"]), code=alert["code"], detail=alert["detail"] or ""
                )
            )


def _print_audit(data: dict[str, Any]) -> None:
    for e in data["entries"]:
        print(
            f"{_local(e['at'])}  {e['actor']} ({e['os_user']})  {e['action']} {e['target']}  "
            f"{e['outcome']}  " + _("reason: {reason}").format(reason=e["reason"])
        )


def _print_breakers(data: dict[str, Any]) -> None:
    for b in data["breakers"]:
        extra = ", " + _("failures {count}").format(count=b["failures"]) if b["failures"] else ""
        state = BREAKER_TEXT.get(b["state"])
        print(f"{b['name']:<20} {_(state) if state else b['state']}{extra}")


def _print_dlq(data: dict[str, Any]) -> None:
    if not data["items"]:
        print(_("dead-letter queue (DLQ) empty"))
    for i in data["items"]:
        print(
            f"#{i['id']:<6} {i['state']:<8} {i['topic']:<12} {i['stream']:<28} "
            + _("attempts {count}").format(count=i["attempts"])
            + f"  {i['last_error'] or ''}"
        )


def _print_reconcile(data: dict[str, Any]) -> None:
    print(_("Since {since}").format(since=_local(data["since"])))
    print(
        _("Executions with events the cloud has not acknowledged yet: {count}").format(
            count=len(data["not_acknowledged"])
        )
    )
    for r in data["not_acknowledged"]:
        print(
            f"  {r['execute_key']:<28} "
            + _("payment {payment}").format(payment=r["payment_id"]).ljust(30)
            + f" {state_name(r['state']):<26} "
            + _("{count} event(s)").format(count=r["events_not_acked"])
            + f" {r['outbox_states']}"
        )
    print(
        _("Executions awaiting compensation or review: {count}").format(
            count=len(data["awaiting_compensation"])
        )
    )
    for r in data["awaiting_compensation"]:
        print(
            f"  {r['execute_key']:<28} "
            + _("payment {payment}").format(payment=r["payment_id"]).ljust(30)
            + f" {state_name(r['state']):<26} "
            + _("compensation: {event}").format(
                event=r["compensation_event"] or _("technician decides")
            )
        )


def _print_executions(data: dict[str, Any]) -> None:
    rows = data["executions"]
    if not rows:
        print(_("no execution found"))
    for r in rows:
        print(
            f"{_local(r['received_at'])}  {r['execute_key']:<28} "
            + _("payment {payment}").format(payment=r["payment_id"]).ljust(30)
            + f" {r['machine_id']:<6} {state_name(r['state'])}"
            + (f" ({r['reason']})" if r["reason"] else "")
        )
    shown = data.get("offset", 0) + len(rows)
    if "total" in data and data["total"] > shown:
        print(
            _("... {count} more (use --offset {offset})").format(
                count=data["total"] - shown, offset=shown
            )
        )


def _print_payment_audit(data: dict[str, Any]) -> None:
    ref = data["provider_ref"] or data["idempotency_key"]
    executions = data["executions"]
    print(
        _(
            "Payment {ref}: {executions} execution(s), {actuations} actuation(s)"
            " confirmed by the board"
        ).format(ref=ref, executions=len(executions), actuations=data["actuations"])
    )
    if data["actuations"] > 1:
        print(_("  WARNING: more than one physical actuation for the same payment"))
    for e in executions:
        print(
            f"  {e['execute_key']}  "
            + _("payment {payment}  machine {machine}  {state}  received {received}").format(
                payment=e["payment_id"],
                machine=e["machine_id"],
                state=state_name(e["state"]),
                received=_local(e["received_at"]),
            )
        )
        for a in e["actuations"]:
            print(
                "    "
                + _("actuation: {at} {reason}").format(at=_local(a["at"]), reason=a["reason"] or "")
            )
        for r in e["results"]:
            comp = " " + _("compensation") if r.get("compensation") else ""
            print(
                "    "
                + _("result #{seq} {state}{compensation}: {outbox} (sent {sent})").format(
                    seq=r["seq"],
                    state=r["state"],
                    compensation=comp,
                    outbox=r["outbox_state"],
                    sent=_local(r["sent_at"]),
                )
            )


def _print_log(data: dict[str, Any]) -> None:
    if not data["entries"]:
        print(_("operation record empty"))
    for e in data["entries"]:
        decision = (
            "  " + _("decision: {decision}").format(decision=e["decision"])
            if e.get("decision")
            else ""
        )
        print(
            f"{_local(e['at'])}  {e['actor']} ({e['os_user']})  {e['action']} {e['target']}"
            f"  {e['outcome']}{decision}"
        )
        print(
            "    "
            + _("reason: {reason}   config: {version}").format(
                reason=e["reason"], version=e.get("config_version") or "-"
            )
        )
        if e.get("before") is not None or e.get("after") is not None:
            print(
                "    "
                + _("before: {before}  after: {after}").format(
                    before=json.dumps(e.get("before"), ensure_ascii=False),
                    after=json.dumps(e.get("after"), ensure_ascii=False),
                )
            )


def _print_reprocess(d: dict[str, Any]) -> None:
    key = d["execute_key"]
    if d["action"] == "redispatched":
        print(
            _(
                "{key}: the board refused it before ({previous}), nothing was actuated;"
                " sent again (follow it: metalavctl execution {key})"
            ).format(key=key, previous=d["previous"])
        )
        return
    print(
        _("{key}: {state}; result sent to the cloud again (no new actuation)").format(
            key=key, state=state_name(d["state"])
        )
    )
    if d.get("not_redispatched"):
        print(
            _(
                "  the board refused it before, but it is not sent again: {why}"
                " (the cloud keeps the failure and its compensation)"
            ).format(why=d["not_redispatched"])
        )
    if d.get("waiting") == "waiting_for_board":
        print(
            _("  not sent to the board yet: it goes by itself when the board answers (or expires)")
        )
    if d["state"] == ExecutionState.NEEDS_REVIEW:
        print(_("  manual review: check the machine and use metalavctl resolve"))
    if d.get("dead_events_retried"):
        print(
            _("  {count} DLQ event(s) back in the outbox").format(
                count=len(d["dead_events_retried"])
            )
        )


def _build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--socket", help=_("unix socket of the daemon's local API"))
    common.add_argument("--config", help=_("the daemon's config file (to find the socket)"))
    common.add_argument("--json", action="store_true", help=_("machine-readable output"))
    action = _Parser(add_help=False, parents=[common])
    action.add_argument("--reason", required=True, help=_("why (recorded in the audit log)"))
    action.add_argument("--by", help=_("technician's name (default: your OS account)"))
    date_help = _("YYYY-MM-DD[THH:MM], local time")

    parser = _Parser(prog="metalavctl", description=_("Meta-Lav gateway: technician CLI"))
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, title=_("commands")
    )
    sub.add_parser("status", parents=[common], help=_("daemon, links, executions, outbox"))
    ex = sub.add_parser("execution", parents=[common], help=_("one execution's whole history"))
    which = ex.add_mutually_exclusive_group(required=True)
    which.add_argument("key", nargs="?", help=_("the execute_key"))
    which.add_argument("--payment", help=_("every execution of this payment_id"))
    exs = sub.add_parser("executions", parents=[common], help=_("list executions (newest first)"))
    exs.add_argument("--state", help=_("only this state (e.g. needs_review)"))
    exs.add_argument("--machine", help=_("only this machine"))
    exs.add_argument("--since", help=_("received at or after this time") + f" ({date_help})")
    exs.add_argument("--until", help=_("received before this time") + f" ({date_help})")
    exs.add_argument("--limit", type=int, default=50, help=_("page size (1..1000)"))
    exs.add_argument("--offset", type=int, default=0, help=_("skip this many"))
    sub.add_parser("machines", parents=[common], help=_("machines: state, last cycle, alerts"))
    aud = sub.add_parser(
        "audit", parents=[common], help=_("operator actions; or a payment's whole trail")
    )
    ref = aud.add_mutually_exclusive_group()
    trail = _("every execution, actuation and result of this payment")
    ref.add_argument("--provider-ref", help=trail)
    ref.add_argument("--idempotency-key", help=trail)
    log = sub.add_parser("log", parents=[common], help=_("the operation record (newest first)"))
    log.add_argument("--since", help=_("from this time") + f" ({date_help})")
    log.add_argument("--limit", type=int, default=50, help=_("how many (1..1000)"))

    res = sub.add_parser(
        "resolve", parents=[action], help=_("end a needs_review execution (never pulses)")
    )
    res.add_argument("key", help=_("the execute_key"))
    res.add_argument(
        "--decision",
        required=True,
        choices=("released", "not_released"),
        help=_("what the technician saw at the machine"),
    )
    rep = sub.add_parser(
        "reprocess",
        parents=[action],
        help=_("re-send the result; re-dispatch only what never reached the board"),
    )
    rep.add_argument("key", help=_("the execute_key"))
    store = sub.add_parser("store", help=_("the whole store")).add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    store.add_parser("pause", parents=[action], help=_("refuse new paid releases (compensated)"))
    store.add_parser("resume", parents=[action], help=_("take paid releases again"))

    relay = sub.add_parser("relay", help=_("relay actions")).add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    test = relay.add_parser("test", parents=[action], help=_("a technical-service test turn"))
    test.add_argument("machine")
    test.add_argument("--cycle", help=_("cycle program to run (default: the machine's first)"))

    machine = sub.add_parser("machine", help=_("machine actions"))
    machine_sub = machine.add_subparsers(dest="sub", required=True, parser_class=_Parser)
    for name, text in (
        ("out-of-service", _("take a machine out of service")),
        ("in-service", _("put a machine back in service")),
    ):
        machine_sub.add_parser(name, parents=[action], help=text).add_argument("machine")

    breakers = sub.add_parser("breakers", parents=[common], help=_("circuit breakers"))
    breakers_sub = breakers.add_subparsers(dest="sub", parser_class=_Parser)
    breakers_sub.add_parser("reset", parents=[action], help=_("close a breaker")).add_argument(
        "name"
    )

    dlq = sub.add_parser("dlq", help=_("dead-letter queue")).add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    dlq.add_parser("list", parents=[common], help=_("dead events")).add_argument(
        "--archived", action="store_true", help=_("include archived ones")
    )
    dlq.add_parser("show", parents=[common], help=_("one event and its attempts")).add_argument(
        "id", type=int
    )
    retry = dlq.add_parser("retry", parents=[action], help=_("send dead events again"))
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("id", type=int, nargs="?")
    target.add_argument("--all", action="store_true")
    retry.add_argument("--limit", type=int, help=_("with --all: at most this many (oldest first)"))
    dlq.add_parser("archive", parents=[action], help=_("keep, never send")).add_argument(
        "id", type=int
    )

    rec = sub.add_parser("reconcile", parents=[common], help=_("what the cloud still lacks"))
    rec.add_argument("--since", required=True, help=date_help)
    clean = sub.add_parser("cleanup", parents=[action], help=_("prune old, acknowledged data"))
    clean.add_argument("--days", type=int, required=True)
    ctl_kit.add_parsers(sub, common)
    return parser


Printer = Callable[[Any], None]


def _done(text: str) -> Printer:
    return lambda _data: print(text)


def _run(args: argparse.Namespace, sock: Path) -> tuple[Any, Printer]:
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
                    ("since", _zoned(args.since)),
                    ("until", _zoned(args.until)),
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
        since = _zoned(args.since)
        query = urlencode({"limit": args.limit, **({"since": since} if since else {})})
        return _request(sock, "GET", f"/v1/log?{query}"), _print_log
    if cmd == "resolve":
        data = _request(
            sock,
            "POST",
            f"/v1/executions/{q(args.key)}/resolve",
            act({"decision": args.decision}),
        )
        compensation = (
            _("result sent to the cloud")
            if data["state"] == ExecutionState.RELEASED
            else _("result sent to the cloud, with compensation")
        )
        return data, _done(
            f"{data['execute_key']}: {state_name(data['state'])} ({data['reason']}); "
            + compensation
        )
    if cmd == "reprocess":
        data = _request(sock, "POST", f"/v1/executions/{q(args.key)}/reprocess", act({}))
        return data, _print_reprocess
    if cmd == "store":
        data = _request(sock, "POST", f"/v1/store/{sub}", act({}))
        text = _("Store PAUSED: new commands are refused") if data["paused"] else _("Store resumed")
        return data, _done(text + ("" if data["changed"] else " " + _("(it already was)")))
    if cmd == "relay":
        data = _request(
            sock, "POST", f"/v1/machines/{q(args.machine)}/relay-test", act({"cycle": args.cycle})
        )
        return data, _done(
            _("relay test sent: {key} (follow it: metalavctl execution {key})").format(
                key=data["execute_key"]
            )
        )
    if cmd == "machine":
        value = sub == "out-of-service"
        data = _request(
            sock, "POST", f"/v1/machines/{q(args.machine)}/service", act({"out_of_service": value})
        )
        text = (
            _("machine {machine}: out of service") if value else _("machine {machine}: in service")
        ).format(machine=args.machine)
        return data, _done(text + ("" if data["changed"] else " " + _("(it already was)")))
    if cmd == "breakers" and sub == "reset":
        data = _request(sock, "POST", f"/v1/breakers/{q(args.name)}/reset", act({}))
        return data, _done(_("breaker {name} closed").format(name=data["reset"]))
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
            raise CtlError(_("--limit only goes with --all"), EXIT_USAGE, "usage")
        body = act({"all": True, "limit": args.limit} if args.all else {"ids": [args.id]})
        data = _request(sock, "POST", "/v1/dlq/retry", body)
        return data, _done(
            _("{count} event(s) back in the outbox").format(count=len(data["retried"]))
        )
    if cmd == "dlq":
        data = _request(sock, "POST", f"/v1/dlq/{args.id}/archive", act({}))
        return data, _done(_("event #{id} archived (kept, never sent)").format(id=data["archived"]))
    if cmd == "reconcile":
        since = _zoned(args.since) or ""
        return _request(sock, "GET", f"/v1/reconcile?since={q(since)}"), _print_reconcile
    data = _request(sock, "POST", "/v1/cleanup", act({"days": args.days}))
    removed = data["removed"]
    return data, _done(
        _(
            "removed: {executions} execution(s), {events} acknowledged event(s),"
            " {archived} archived DLQ item(s), {audit} audit row(s), {refusals} refusal(s)"
        ).format(
            executions=removed["executions"],
            events=removed["outbox_events"],
            archived=removed.get("archived_events", 0),
            audit=removed.get("audit_rows", 0),
            refusals=removed.get("refusals", 0),
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    try:
        args = _build_parser().parse_args(argv)
        if args.command in ctl_kit.COMMANDS:
            return ctl_kit.run(args)
        sock = _socket_path(args)
        data, printer = _run(args, sock)
        if args.json:
            print(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            printer(data)
        if args.command == "status":
            return HEALTH_EXIT.get((data.get("health") or {}).get("level", "normal"), 0)
        return 0
    except CtlError as exc:
        if as_json:
            error = "not_found" if exc.code == EXIT_NOT_FOUND else exc.error
            print(json.dumps({"error": error, "message": str(exc)}, ensure_ascii=False))
        print(f"metalavctl: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # a bug here must still be one line for the technician
        message = _("internal error ({kind}): {error}").format(kind=type(exc).__name__, error=exc)
        if as_json:
            print(json.dumps({"error": "internal_error", "message": message}, ensure_ascii=False))
        print(f"metalavctl: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
