"""Journal rows for the tests that write the journal directly (no command, no token)."""

from __future__ import annotations

from typing import Any

from gateway.dispatch import command_id_for
from gateway.journal import NewExecution


def new_execution(key: str, *, now: float = 0.0, ttl_s: int = 60, **fields: Any) -> NewExecution:
    """A paid command for washer W1 issued at ``now``, valid ``ttl_s``; ``fields``
    override any column (payment_id, machine_id, awaits_start, kind...)."""
    values: dict[str, Any] = {
        "execute_key": key,
        "command_id": command_id_for(key),
        "payment_id": f"pay-{key}",
        "machine_id": "W1",
        "cycle": "normal",
        "issued_at": int(now),
        "expires_at": int(now) + ttl_s,
        "provider_ref": None,
        "idempotency_key": None,
        "amount_cents": None,
    }
    values.update(fields)
    return NewExecution(**values)
