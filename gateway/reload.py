"""SIGHUP: re-read the config file, apply what can change live, name what cannot.

Live (taken at their next use, no restart):

- ``logging.level``;
- ``outbox.warn_depth``, ``outbox.critical_depth`` (the depth alerts),
  ``outbox.max_attempts``, ``outbox.sending_timeout_s``, ``outbox.batch_size``,
  ``outbox.https_bulk_threshold`` (the dispatcher);
- ``breakers.failure_threshold``, ``breakers.reset_timeout_s``.

Everything else (gateway id, journal, broker, board, commands' keys, machines and
their cycles, API socket, cloud endpoint, credentials) is built into long-lived parts
(the journal file, the MQTT session, the board driver, the verifier, the machine
monitor): a change is logged with its key names and waits for a restart. The running
values stay in force meanwhile, so the daemon never runs half of one config and half
of another in a part.

An invalid file changes nothing: the daemon logs one line per problem and keeps
running on what it had.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import GatewayConfig

__all__ = ["LIVE_KEYS", "ReloadPlan", "plan_reload"]

LIVE_KEYS = frozenset(
    {
        "logging.level",
        "outbox.warn_depth",
        "outbox.critical_depth",
        "outbox.max_attempts",
        "outbox.sending_timeout_s",
        "outbox.batch_size",
        "outbox.https_bulk_threshold",
        "breakers.failure_threshold",
        "breakers.reset_timeout_s",
    }
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"outbox.warn_depth": 100, ...}``; lists (the machines) are one key each."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


@dataclass
class ReloadPlan:
    #: The config to run on: the running one with the live keys of the new file.
    config: GatewayConfig
    #: Live keys that change: key -> (before, after).
    live: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    #: Keys that change but only take effect at the next start (names only: some
    #: are secrets).
    restart: list[str] = field(default_factory=list)


def plan_reload(running: GatewayConfig, new: GatewayConfig) -> ReloadPlan:
    before = _flatten(running.model_dump(mode="json"))
    after = _flatten(new.model_dump(mode="json"))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    plan = ReloadPlan(running)
    for key in changed:
        if key in LIVE_KEYS:
            plan.live[key] = (before.get(key), after.get(key))
        else:
            plan.restart.append(key)
    config = running
    for key in plan.live:
        section_name, name = key.split(".")
        section = getattr(config, section_name).model_copy(
            update={name: getattr(getattr(new, section_name), name)}
        )
        config = config.model_copy(update={section_name: section})
    plan.config = config
    return plan
