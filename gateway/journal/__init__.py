"""The execution journal: one SQLite file, the gateway's memory across crashes.

One row per ``execute_key`` holds the lifecycle state (gateway/lifecycle.py); every
state change appends a history row and, in the same transaction, the outbox row that
reports it to the cloud. The database runs in WAL mode and a write is durable (it
survives ``kill -9`` and power loss) once flushed: a method here flushes before it
returns, unless called with ``durable=False``, whose caller awaits
``Journal.flushed()`` before it acknowledges (promise 3) or drives the relay (promise 1)
— see database.py.

All methods are synchronous and meant to be called from the daemon's event-loop
thread only; a flush costs one fsync, which is the price of the promises.

One module per job, each a class over the same open file (:class:`Database`)::

    errors       JournalError, JournalUnwritable, JournalFault
    schema       tables and append-only migrations
    database     connection, transactions, fault handling
    executions   record (a NewExecution), transition, reads, dispatch stamps, in-doubt marks
    outbox       events queued with their change; the dispatcher's OutboxStore
    dlq          the dead-letter queue (metalavctl dlq)
    records      audit log, out-of-service flags, rejections, alerts, board state
    retention    reconcile, cleanup
    operations   lookups, technician decisions (resolve, reprocess), store pause, pruning
    gauges       cheap reads for health checks and metrics

:class:`Journal` is those classes combined, the one object the rest of the gateway
holds. They share nothing but :class:`Database` (one connection, one transaction
helper): none calls another's methods, and a write that spans jobs in one transaction
(a transition with its alert, a DLQ retry with its audit line) calls the module-level
writer of the other job (``append_event``, ``write_alert``, ``write_audit``) with the
open connection.
"""

from __future__ import annotations

from ..events import Alert, alert_event, iso_utc, result_payload
from ..lifecycle import (
    ACTIVE,
    AUTO_COMPENSATED,
    COMPENSATED,
    FINAL,
    PENDING_START,
    IllegalTransition,
    ordered,
)
from .database import Database
from .dlq import DeadLetters
from .errors import JournalError, JournalFault, JournalUnwritable
from .executions import DispatchStamp, Execution, Executions, NewExecution
from .gauges import Gauges
from .operations import Operations, Refused, StorePause
from .outbox import OUTBOX_STATES, Outbox
from .records import OperatorRecords
from .retention import Retention
from .schema import SCHEMA_VERSION

__all__ = [
    "ACTIVE_STATES",
    "AUTO_COMPENSATION_STATES",
    "Alert",
    "COMPENSATION_STATES",
    "DispatchStamp",
    "FINAL_STATES",
    "Execution",
    "IllegalTransition",
    "Journal",
    "JournalError",
    "JournalFault",
    "JournalUnwritable",
    "NewExecution",
    "OUTBOX_STATES",
    "Refused",
    "StorePause",
    "SCHEMA_VERSION",
    "alert_event",
    "iso_utc",
    "result_payload",
]

# The lifecycle's sets under their former names, for the callers that import them.
ACTIVE_STATES = ordered(ACTIVE)
#: Final for some machine: ``released`` only without a busy input (lifecycle.is_final).
FINAL_STATES = ordered(FINAL | PENDING_START)
COMPENSATION_STATES = ordered(COMPENSATED)
AUTO_COMPENSATION_STATES = ordered(AUTO_COMPENSATED)


class Journal(
    Executions, Outbox, DeadLetters, OperatorRecords, Retention, Operations, Gauges, Database
):
    """The journal file and every job done on it: ``Journal(path, gateway_id)`` opens
    (creating or migrating) the file."""
