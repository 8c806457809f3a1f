"""docs/mqtt-contract.md is what the cloud team builds on: every example in it validates
against its schema, and so does every payload the gateway's code really produces
(results in every state, compensation, cycle and alert events, presence, the claims of
a reference token). A schema, an example or the code that disagrees fails here.

Convention (stated in the document): each ```json block is preceded by a marker line,
``<!-- schema: NAME -->`` or ``<!-- example: NAME -->``.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from cloud_sync.commands import EXECUTE_KEY_PATTERN, MAX_INTEGER_CLAIM, MAX_TEXT_CLAIM_CHARS
from cloud_sync.mqtt_session import (
    COMMANDS_TOPIC,
    EVENT_TOPICS,
    PRESENCE_TOPIC,
    STATUS_TOPIC,
    _presence,
)
from cloud_sync.signing import generate_demo_keypair, sign_command
from gateway.events import Alert, result_payload
from gateway.journal import DispatchStamp, Journal, NewExecution, Refused
from gateway.lifecycle import (
    AUTO_COMPENSATED,
    COMPENSATED,
    FINAL,
    PENDING_START,
    UNREPORTED,
    ExecutionState,
    ordered,
)

#: The states a result event may carry: every state but those the cloud never sees.
REPORTED_STATES = ordered(set(ExecutionState) - UNREPORTED)

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONTRACT = DOCS / "mqtt-contract.md"
CLOUD_API = DOCS / "cloud-api.yaml"

_MARKED = re.compile(r"^<!-- (schema|example): ([a-z0-9-]+) -->\n```json\n(.*?)^```$", re.M | re.S)
_FENCE = re.compile(r"^```json$", re.M)

# Outbox topic -> the schema its events follow.
SCHEMA_OF_TOPIC = {
    "results": "execution-result",
    "compensation": "payment-compensation",
    "cycles": "cycle-event",
    "alerts": "alert",
    "operations": "operation-record",
}
TECHNICIAN_REASONS = ("technician_released", "technician_not_released")
GATEWAY_REFUSALS = (
    "unknown_machine",
    "unknown_cycle",
    "machine_busy",
    "out_of_service",
    "store_paused",
)


def _contract() -> tuple[dict[str, dict[str, Any]], list[tuple[str, Any]]]:
    text = CONTRACT.read_text()
    schemas: dict[str, dict[str, Any]] = {}
    examples: list[tuple[str, Any]] = []
    marked = _MARKED.findall(text)
    assert len(marked) == len(_FENCE.findall(text)), "a ```json block without its marker"
    for kind, name, body in marked:
        data = json.loads(body)
        if kind == "schema":
            assert name not in schemas, f"schema {name} defined twice"
            schemas[name] = data
        else:
            examples.append((name, data))
    return schemas, examples


SCHEMAS, EXAMPLES = _contract()


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema, refusing fields it does not declare: the gateway sends nothing the
    contract does not describe (consumers may still ignore unknown fields)."""
    strict = copy.deepcopy(schema)
    strict["additionalProperties"] = False
    return strict


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(
        _strict(SCHEMAS[name]), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def _assert_valid(name: str, instance: Any) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in _validator(name).iter_errors(instance)
    ]
    assert not errors, f"{name}: {instance}\n" + "\n".join(errors)


def test_every_json_block_of_the_contract_is_a_schema_or_an_example_of_one() -> None:
    assert set(SCHEMAS) == {
        "presence",
        "heartbeat",
        "execute-command-claims",
        "execution-result",
        "payment-compensation",
        "cycle-event",
        "alert",
        "operation-record",
    }
    for name, schema in SCHEMAS.items():
        Draft202012Validator.check_schema(schema)
        assert any(n == name for n, _ in EXAMPLES), f"schema {name} has no example"
    assert {n for n, _ in EXAMPLES} <= set(SCHEMAS)


@pytest.mark.parametrize(
    ("name", "example"),
    EXAMPLES,
    ids=[f"{n}-{i}" for i, (n, _) in enumerate(EXAMPLES)],
)
def test_contract_example_validates_against_its_schema(name: str, example: Any) -> None:
    _assert_valid(name, example)


# -- what the code produces ---------------------------------------------------------


def _journal_with_every_outcome(tmp_path: Path) -> tuple[Journal, dict[str, str]]:
    """A real journal driven through every state a paid command and a technician's
    test turn can reach; returns it and the kind of each execute_key."""
    journal = Journal(tmp_path / "journal.db", "gw-loja-042")
    now = time.time()
    kinds: dict[str, str] = {}

    def new(key: str, state: str, reason: str | None = None, *, kind: str = "payment") -> None:
        kinds[key] = kind
        paid = kind == "payment"
        command = NewExecution(
            execute_key=key,
            command_id=len(kinds),
            payment_id=f"pay-{key}" if paid else "technical-service",
            machine_id="W9" if reason == "unknown_machine" else "W1",
            cycle="normal",
            issued_at=int(now),
            expires_at=int(now) + 300,
            provider_ref="stone-1" if paid else None,
            idempotency_key="idem-1" if paid else None,
            amount_cents=1500 if paid else None,
            kind=kind,
            awaits_start=True,
        )
        journal.record(
            command,
            ExecutionState(state),
            reason=reason,
            now=now,
            dispatch=DispatchStamp(7, 0, 1) if state == "dispatching" else None,
        )

    def move(key: str, to: str, reason: str | None = None, **extra: Any) -> None:
        state = journal.get(key).state  # type: ignore[union-attr]
        assert journal.transition(
            key, from_states=(state,), to_state=to, reason=reason, now=now, **extra
        )

    cycle = {"machine_id": "W1", "cycle": "normal"}
    for kind, prefix in (("payment", "exec"), ("technical_service", "tech")):
        new(f"{prefix}-started", "dispatching", kind=kind)
        move(f"{prefix}-started", "released", times={"released_at": now})
        move(f"{prefix}-started", "started", cycle_event=cycle)
        move(f"{prefix}-started", "completed", cycle_event={**cycle, "duration_s": 2400.5})
        new(f"{prefix}-late", "dispatching", kind=kind)
        move(f"{prefix}-late", "released")
        move(
            f"{prefix}-late",
            "not_started",
            "no_start_in_confirm_window",
            alert=Alert("not_started", "critical", "W1", f"{prefix}-late", "did not start"),
        )
        move(f"{prefix}-late", "started", "late_start", cycle_event=cycle)
        new(f"{prefix}-nack", "dispatching", kind=kind)
        move(f"{prefix}-nack", "failed", "board_nack:channel_busy")
        new(f"{prefix}-review", "dispatching", kind=kind)
        move(f"{prefix}-review", "needs_review", "board_reset_during_dispatch")
        new(f"{prefix}-waited", "accepted", kind=kind)
        move(f"{prefix}-waited", "expired", "command_expired")
    new("exec-expired", "expired", "command_expired")
    for reason in GATEWAY_REFUSALS:
        new(f"exec-{reason.replace('_', '-')}", "rejected", reason)
    journal.raise_alert(Alert("board_link_lost", "critical", detail="no reply"), now=now)
    journal.raise_alert(Alert("out_of_service", "warning", "W2", detail="by Ana"), now=now)
    journal.raise_alert(Alert("start_without_release", "info", "W1"), now=now)
    # Operation records (issue 12): one applied with a decision, one refused.
    journal.note_identity(gateway_id="gw", config_version="sha256:0123456789abcdef")
    journal.set_store_pause(True, reason="auditoria", actor="Ana", os_user="root", now=now)
    for key, released in (("exec-nack", True), ("exec-review", False), ("tech-review", True)):
        with contextlib.suppress(Refused):  # exec-nack is not waiting for review
            journal.resolve_review(
                key,
                released=released,
                now=now,
                audit={
                    "action": "execution.resolve",
                    "target": key,
                    "actor": "Ana",
                    "os_user": "uid:1001",
                    "reason": "conferido",
                    "decision": "released" if released else "not_released",
                },
            )
    return journal, kinds


def test_events_the_journal_produces_match_the_contract(tmp_path: Path) -> None:
    journal, kinds = _journal_with_every_outcome(tmp_path)
    items = journal.claim(1000, now=time.time())
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        event = json.loads(item.payload)
        _assert_valid(SCHEMA_OF_TOPIC[item.topic], event)
        by_topic.setdefault(item.topic, []).append(event)

    results = by_topic["results"]
    states = SCHEMAS["execution-result"]["properties"]["state"]["enum"]
    assert {r["state"] for r in results} == set(states)
    # Compensation: every paid execution that did not (or may not have) run says so;
    # a technician's test turn never does.
    for r in results:
        paid = kinds[r["execute_key"]] == "payment"
        assert r["compensation"] is (paid and r["state"] in COMPENSATED), r
    compensated = [(e["execute_key"], e["reason"]) for e in by_topic["compensation"]]
    assert sorted(compensated) == sorted(
        (r["execute_key"], r["reason"])
        for r in results
        if kinds[r["execute_key"]] == "payment" and r["state"] in AUTO_COMPENSATED
    )
    assert {reason for _, reason in compensated} >= set(GATEWAY_REFUSALS)
    assert {e["type"] for e in by_topic["cycles"]} == {"cycle.started", "cycle.completed"}
    assert len(by_topic["alerts"]) == 5  # two not_started, three raised
    operations = by_topic["operations"]
    assert [(o["action"], o["outcome"]) for o in operations] == [
        ("store.pause", "applied"),
        ("execution.resolve", "refused:not_needs_review"),
        ("execution.resolve", "applied"),
        ("execution.resolve", "applied"),
    ]
    resolved = {r["execute_key"]: r for r in results if r["reason"] in TECHNICIAN_REASONS}
    assert resolved["exec-review"]["state"] == "failed"
    assert resolved["exec-review"]["compensation"] is True
    assert resolved["tech-review"]["state"] == "released"
    assert resolved["tech-review"]["compensation"] is False
    assert {o["config_version"] for o in operations} == {"sha256:0123456789abcdef"}


def test_result_payloads_in_every_state_match_the_contract() -> None:
    common: dict[str, Any] = {"gateway_id": "gw-loja-042", "at": "2026-11-23T17:55:00.012Z"}
    for state in REPORTED_STATES:
        for payment_id, paid in (("pay-1", True), ("technical-service", False)):
            for awaits_start in (False, True):
                payload = result_payload(
                    **common,
                    execute_key="exec-1",
                    payment_id=payment_id,
                    machine_id="W1",
                    state=state,
                    reason=None,
                    seq=1,
                    paid=paid,
                    awaits_start=awaits_start,
                    payment={"provider_ref": "stone-1", "amount_cents": 1500},
                )
                _assert_valid("execution-result", json.loads(payload))
    for key, reason in (("exec-1", "bad_signature"), (None, "malformed")):
        unauthenticated = result_payload(
            **common,
            execute_key=key,
            payment_id=None,
            machine_id=None,
            state="rejected",
            reason=reason,
            seq=0,
            authentic=False,
        )
        _assert_valid("execution-result", json.loads(unauthenticated))

    # The schema holds the promise too: a paid refusal without compensation (what the
    # gateway used to send) is refused, and so is a compensated test turn.
    paid_refusal = json.loads(
        result_payload(
            **common,
            execute_key="exec-2",
            payment_id="pay-2",
            machine_id="W1",
            state="rejected",
            reason="machine_busy",
            seq=1,
        )
    )
    _assert_valid("execution-result", paid_refusal)
    validator = _validator("execution-result")
    assert not validator.is_valid({**paid_refusal, "compensation": False})
    assert not validator.is_valid({**paid_refusal, "payment_id": "technical-service"})
    assert not validator.is_valid({**paid_refusal, "authentic": False, "seq": 0})


def test_presence_and_reference_token_claims_match_the_contract() -> None:
    for state in ("online", "offline"):
        _assert_valid("presence", json.loads(_presence(state, "gw-loja-042")))

    private_pem, _ = generate_demo_keypair()
    token = sign_command(
        private_pem,
        execute_key="exec-7f3a9c2e01b84d55",
        audience="gw-loja-042",
        payment_id="pay-1",
        machine_id="W1",
        cycle="normal",
        amount_cents=1500,
        provider_ref="stone-1",
        idempotency_key="idem-1",
        store_id="loja-042",
    )
    body = token.split(b".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    _assert_valid("execute-command-claims", claims)

    # The limits the verifier enforces are the ones the schema states.
    props = SCHEMAS["execute-command-claims"]["properties"]
    assert props["jti"]["pattern"] == f"^{EXECUTE_KEY_PATTERN.pattern}$"
    for name in ("iat", "exp", "nbf", "amount_cents"):
        assert (props[name]["minimum"], props[name]["maximum"]) == (0, MAX_INTEGER_CLAIM)
    for name in ("payment_id", "machine_id", "cycle", "provider_ref", "idempotency_key"):
        assert props[name]["maxLength"] == MAX_TEXT_CLAIM_CHARS


def _state_table() -> dict[str, tuple[str, str]]:
    """The result section's table: state -> its (final, compensation) columns."""
    text = CONTRACT.read_text()
    start = text.index("| state | final | meaning | compensation |")
    rows: dict[str, tuple[str, str]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[3])
    return rows


def test_state_table_says_what_the_lifecycle_says() -> None:
    table = _state_table()
    result = SCHEMAS["execution-result"]
    states = result["properties"]["state"]["enum"]
    # In the lifecycle's order, every state a result may carry, and only those.
    assert list(table) == states == list(REPORTED_STATES)
    for state, (final, compensation) in table.items():
        if state in PENDING_START:
            assert final == "yes, unless the machine has a busy input", state
        else:
            assert final.startswith("yes" if state in FINAL else "no"), state
        assert compensation.startswith("**yes**" if state in COMPENSATED else "no"), state
    # The schema's own lists of compensated states.
    lists = [
        part["properties"]["state"]["enum"]
        for rule in result["allOf"]
        if "compensat" in rule["description"]
        for part in (rule["if"], rule["then"])
        if "enum" in part["properties"].get("state", {})
    ]
    assert len(lists) == 2 and all(set(states) == COMPENSATED for states in lists)


def test_cloud_api_compensation_event_is_the_mqtt_one(tmp_path: Path) -> None:
    api = yaml.safe_load(CLOUD_API.read_text())
    mqtt_schema = SCHEMAS["payment-compensation"]
    http_schema = api["components"]["schemas"]["CompensationEvent"]
    assert set(http_schema["required"]) == set(mqtt_schema["required"])
    assert set(http_schema["properties"]) == set(mqtt_schema["properties"])
    assert (
        http_schema["properties"]["reason"]["pattern"]
        == (mqtt_schema["properties"]["reason"]["pattern"])
    )

    # The events the gateway posts validate against the API's own schemas.
    registry: Registry[Any] = Registry().with_resource(
        "urn:cloud-api", Resource.from_contents(api, default_specification=DRAFT202012)
    )

    def validator(component: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"urn:cloud-api#/components/schemas/{component}"},
            registry=registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    journal, _ = _journal_with_every_outcome(tmp_path)
    events = [json.loads(i.payload) for i in journal.claim(500, now=time.time())]
    compensations = [e for e in events if e["type"] == "payment.compensation"]
    assert compensations
    for event in compensations:
        errors = [e.message for e in validator("CompensationEvent").iter_errors(event)]
        assert not errors, (event, errors)
    errors = [e.message for e in validator("EventBatch").iter_errors({"events": events})]
    assert not errors


def test_the_topic_table_names_exactly_the_topics_the_code_uses() -> None:
    # The code's names (cloud_sync.mqtt_session) against the contract's "Topics" table.
    table = re.findall(r"^\| `P/([a-z/]+)` \|", CONTRACT.read_text(), re.M)
    assert sorted(table) == sorted([COMMANDS_TOPIC, PRESENCE_TOPIC, STATUS_TOPIC, *EVENT_TOPICS])
    assert set(SCHEMA_OF_TOPIC) == set(EVENT_TOPICS)


def _heartbeats(tmp_path: Path) -> list[dict[str, Any]]:
    """Heartbeats the code builds: a healthy store, and one with every check failing."""
    from devtools.stack import demo_config
    from gateway.alerting import DeadLetterWatch
    from gateway.clock import ClockWatch
    from gateway.config import load_config
    from gateway.health import HealthMonitor, Links
    from gateway.heartbeat import heartbeat_payload
    from gateway.metrics import GatewayMetrics

    _, public_pem = generate_demo_keypair()
    path = tmp_path / "gateway.toml"
    path.write_text(
        demo_config(
            tmp_path,
            gateway_id="gw-loja-042",
            mqtt_port=1883,
            public_key_pem=public_pem,
            board_port=tmp_path / "board",
        )
    )
    config = load_config(path)
    journal = Journal(config.journal.path, config.gateway.id)
    payloads = []
    for healthy in (True, False):
        clock = ClockWatch(probe=lambda healthy=healthy: healthy)
        monitor = HealthMonitor(
            config,
            journal,
            GatewayMetrics(),
            clock,
            Links(
                board_up=lambda healthy=healthy: healthy,
                broker_up=lambda healthy=healthy: healthy,
                journal_fault=lambda healthy=healthy: None if healthy else "disk full",
                breakers=lambda healthy=healthy: {"mqtt": "closed" if healthy else "open"},
                https_configured=not healthy,
            ),
            started_at=time.time(),
        )
        dead = DeadLetterWatch(journal.dlq_size, lambda alert: None)
        payloads.append(
            heartbeat_payload(
                monitor,
                monitor.snapshot(),
                gateway_id=config.gateway.id,
                store_id="" if healthy else "loja-042",
                now=time.time(),
                last_dead_at=dead.last_dead_at if healthy else time.time(),
            )
        )
    journal.close()
    return payloads


def test_heartbeat_the_code_builds_matches_the_contract(tmp_path: Path) -> None:
    healthy, failing = _heartbeats(tmp_path)
    for payload in (healthy, failing):
        _assert_valid("heartbeat", payload)
    assert failing["level"] == "critical" and failing["open_breakers"] == ["mqtt"]
    names = SCHEMAS["heartbeat"]["properties"]["checks"]["propertyNames"]["enum"]
    assert sorted(healthy["checks"]) == sorted(names)


# Alert codes the code raises: Alert("code", ...) literals, and the outbox depth family.
_ALERT_LITERAL = re.compile(r'Alert\(\s*"([a-z_]+)"')


def test_every_alert_code_the_code_raises_is_in_the_contract_table() -> None:
    root = Path(__file__).resolve().parents[1]
    raised = {
        code
        for package in ("gateway", "cloud_sync")
        for source in (root / package).rglob("*.py")
        for code in _ALERT_LITERAL.findall(source.read_text())
    }
    raised |= {f"outbox_depth_{level}" for level in ("normal", "warning", "critical")}
    text = CONTRACT.read_text()
    table = text[text.index("| code | severity | meaning |") :]
    documented = set(re.findall(r"`([a-z_]+)`", table.split("\n\n")[0]))
    assert raised <= documented, sorted(raised - documented)
