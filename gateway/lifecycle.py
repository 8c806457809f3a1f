"""The execution lifecycle as data: its states, the allowed moves, what each state means.

The execution lifecycle as data: its states, the moves between them, and what each
state means to the cloud and to the machine (DESIGN.md, "The execution lifecycle").

A command refused before it was journaled (the verifier's rejections) has no state
here: it never gets a row. Everything else starts in one of :data:`INITIAL_STATES`
and moves only along :data:`TRANSITIONS`; the journal refuses any other move with
:class:`IllegalTransition`. History lines that do not change the state (a re-dispatch,
an in-doubt mark, a re-stamp) are not moves.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType

__all__ = [
    "ACTIVE",
    "AUTO_COMPENSATED",
    "COMPENSATED",
    "FINAL",
    "INITIAL_STATES",
    "PENDING_START",
    "TRANSITIONS",
    "UNREPORTED",
    "ExecutionState",
    "IllegalTransition",
    "check_initial",
    "check_transition",
    "is_final",
    "keeps_machine_busy",
    "ordered",
]


class ExecutionState(enum.StrEnum):
    """The ``state`` of a journal row and of an ``execution.result`` event; the values
    are the exact strings stored in SQLite and sent to the cloud."""

    ACCEPTED = "accepted"
    DISPATCHING = "dispatching"
    RELEASED = "released"
    STARTED = "started"
    NOT_STARTED = "not_started"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    NEEDS_REVIEW = "needs_review"


_S = ExecutionState

#: The states a new journal row may take: ``accepted`` (waits for the board),
#: ``dispatching`` (accepted and, in the same commit, about to be written to the
#: board), or a refusal of an authentic command (``rejected`` / ``expired``).
INITIAL_STATES: frozenset[ExecutionState] = frozenset(
    {_S.ACCEPTED, _S.DISPATCHING, _S.REJECTED, _S.EXPIRED}
)

#: from-state -> the states it may move to. Every move the gateway makes, and only those.
TRANSITIONS: Mapping[ExecutionState, frozenset[ExecutionState]] = MappingProxyType(
    {
        # Dispatched once the board is there; expired if it never comes in time.
        _S.ACCEPTED: frozenset({_S.DISPATCHING, _S.EXPIRED}),
        _S.DISPATCHING: frozenset(
            {
                _S.ACCEPTED,  # proved not sent (board unavailable): waits for the board again
                _S.RELEASED,  # the board acknowledged, or answered "executed" to a query
                _S.FAILED,  # the board proved it did not act (NACK)
                _S.EXPIRED,  # never reached the board, and now too late
                _S.NEEDS_REVIEW,  # in doubt and the board cannot settle it (runbook incident A)
            }
        ),
        # Machines with a busy input: the start confirmation decides.
        _S.RELEASED: frozenset({_S.STARTED, _S.NOT_STARTED}),
        _S.NOT_STARTED: frozenset({_S.STARTED}),  # a late start, within the grace period
        _S.STARTED: frozenset({_S.COMPLETED}),
        _S.COMPLETED: frozenset(),
        # ``metalavctl reprocess``, only for a board NACK (the board proved it did not
        # act) whose failure the cloud has not been told yet: the first real release.
        _S.FAILED: frozenset({_S.DISPATCHING}),
        _S.REJECTED: frozenset(),
        _S.EXPIRED: frozenset(),
        # Never moved automatically, never re-pulsed: a technician looked at the machine
        # and decides (``metalavctl resolve``): it ran (released, final) or it did not
        # (failed, compensated).
        _S.NEEDS_REVIEW: frozenset({_S.RELEASED, _S.FAILED}),
    }
)

#: Work still to do: the machine is taken, the cloud has no outcome yet.
ACTIVE: frozenset[ExecutionState] = frozenset({_S.ACCEPTED, _S.DISPATCHING})

#: ``released`` depends on the machine. With a busy input (``awaits_start``) its start is
#: still to be confirmed: the machine stays busy and the result is not final. Without
#: one nothing more will be learned: the result is final and the machine free.
PENDING_START: frozenset[ExecutionState] = frozenset({_S.RELEASED})

#: Reported final to the cloud whatever the machine (``started`` and ``not_started``
#: are final outcomes even though a cycle end or a late start may still follow).
FINAL: frozenset[ExecutionState] = frozenset(
    {_S.STARTED, _S.NOT_STARTED, _S.COMPLETED, _S.FAILED, _S.REJECTED, _S.EXPIRED, _S.NEEDS_REVIEW}
)

#: The result says ``compensation: true`` (for a paid command): every authentic command
#: is a confirmed payment, so every outcome in which the machine did not (or may not
#: have) run (DESIGN.md promise 2). ``rejected`` is the gateway's refusal of an
#: authentic command; the verifier's rejections are never journaled nor compensated.
COMPENSATED: frozenset[ExecutionState] = frozenset(
    {_S.NOT_STARTED, _S.FAILED, _S.REJECTED, _S.EXPIRED, _S.NEEDS_REVIEW}
)

#: Of those, the ones where the gateway knows nothing ran and emits the
#: ``payment.compensation`` event itself; ``needs_review`` is a technician's call.
AUTO_COMPENSATED: frozenset[ExecutionState] = COMPENSATED - {_S.NEEDS_REVIEW}

#: Never carried by a result event: the cloud sees ``accepted`` until the outcome.
UNREPORTED: frozenset[ExecutionState] = frozenset({_S.DISPATCHING})


class IllegalTransition(ValueError):
    """A move the lifecycle does not allow (or a state it does not know): a bug in the
    caller, refused before anything is written. ``from_state`` is None for the first
    state of a new row."""

    def __init__(self, from_state: str | None, to_state: str) -> None:
        if from_state is None:
            message = f"a new execution may not start in {str(to_state)!r}"
        else:
            message = f"illegal transition {str(from_state)!r} -> {str(to_state)!r}"
        super().__init__(message)
        self.from_state = from_state
        self.to_state = to_state


def _known(state: str) -> ExecutionState | None:
    try:
        return ExecutionState(state)
    except ValueError:
        return None


def check_initial(state: str) -> ExecutionState:
    """``state`` as an :class:`ExecutionState` if a new row may take it, else raise."""
    known = _known(state)
    if known is None or known not in INITIAL_STATES:
        raise IllegalTransition(None, state)
    return known


def check_transition(from_states: Iterable[str], to_state: str) -> ExecutionState:
    """``to_state`` as an :class:`ExecutionState` if every ``from -> to`` move is in
    :data:`TRANSITIONS`, else raise :class:`IllegalTransition` naming the first that is
    not."""
    sources = tuple(from_states)
    if not sources:
        raise ValueError("a transition needs at least one from-state")
    to = _known(to_state)
    for from_state in sources:
        known = _known(from_state)
        if to is None or known is None or to not in TRANSITIONS[known]:
            raise IllegalTransition(from_state, to_state)
    assert to is not None  # checked against the first from-state
    return to


def is_final(state: str, *, awaits_start: bool) -> bool:
    """Whether the cloud is told this outcome is final (``final`` of the result)."""
    return state in FINAL or (state in PENDING_START and not awaits_start)


def keeps_machine_busy(state: str, *, awaits_start: bool) -> bool:
    """Whether an execution in ``state`` keeps its machine from taking another release."""
    return state in ACTIVE or (state in PENDING_START and awaits_start)


def ordered(states: Iterable[str]) -> tuple[ExecutionState, ...]:
    """``states`` in the lifecycle's order (for stable SQL and printouts)."""
    wanted = set(states)
    return tuple(s for s in ExecutionState if s in wanted)
