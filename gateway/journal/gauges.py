"""Cheap reads for health checks and metrics: each one an indexed query or a stat.

Read at most about once a second (the health monitor caches them), never on the
release path.
"""

from __future__ import annotations

import os
from datetime import datetime

from .database import Database

__all__ = ["Gauges"]


class Gauges(Database):
    def outbox_counts(self) -> dict[str, int]:
        """Events by state, for the states that stay small: each count walks only its
        own rows of the (state, id) index. ``sent`` and ``archived`` grow with the
        history and are left out (a scan of them would stall the event loop)."""
        return {
            state: int(
                self._conn.execute(
                    "SELECT count(*) FROM outbox WHERE state = ?", (state,)
                ).fetchone()[0]
            )
            for state in ("pending", "sending", "failed", "dead")
        }

    def dlq_size(self) -> int:
        """Dead events (not archived) waiting for a technician."""
        row = self._conn.execute("SELECT count(*) FROM outbox WHERE state = 'dead'").fetchone()
        return int(row[0])

    def oldest_undelivered_at(self) -> float | None:
        """Creation time (epoch) of the oldest event still to deliver, or None."""
        # The first row of each state by id: the (state, id) index, not a scan of a
        # backlog that may hold 100,000 events.
        oldest: str | None = None
        for state in ("pending", "sending", "failed"):
            row = self._conn.execute(
                "SELECT created_at FROM outbox WHERE state = ? ORDER BY id LIMIT 1", (state,)
            ).fetchone()
            if row is not None and (oldest is None or row[0] < oldest):
                oldest = row[0]
        if oldest is None:
            return None
        return datetime.fromisoformat(str(oldest).replace("Z", "+00:00")).timestamp()

    def rejection_counts(self) -> dict[str, int]:
        """Commands the verifier refused, by reason (since the journal was created)."""
        return {
            str(reason): int(n)
            for reason, n in self._conn.execute(
                "SELECT reason, count(*) FROM rejections GROUP BY reason"
            )
        }

    def file_bytes(self) -> int:
        """The journal file with its WAL and shared-memory files."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except OSError:
                pass
        return total
