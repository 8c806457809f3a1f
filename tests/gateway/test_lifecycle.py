"""The lifecycle is a table, and the journal moves executions along it and nowhere else
(DESIGN.md "The execution lifecycle"; promise 2: no paid cycle is silently lost)."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway import journal as journal_module
from gateway.journal import DispatchStamp, Journal
from gateway.lifecycle import (
    ACTIVE,
    AUTO_COMPENSATED,
    COMPENSATED,
    FINAL,
    INITIAL_STATES,
    PENDING_START,
    TRANSITIONS,
    UNREPORTED,
    ExecutionState,
    IllegalTransition,
    is_final,
    keeps_machine_busy,
)
from tests.rows import new_execution

S = ExecutionState
ALL = tuple(ExecutionState)
TYPO = "relesed"


def _path_to(target: ExecutionState) -> list[ExecutionState]:
    """The shortest walk through the table from a first state to ``target``."""
    queue = deque([[s] for s in sorted(INITIAL_STATES)])
    while queue:
        walk = queue.popleft()
        if walk[-1] == target:
            return walk
        queue.extend([*walk, nxt] for nxt in sorted(TRANSITIONS[walk[-1]]) if nxt not in walk)
    raise AssertionError(f"{target} is unreachable")


def _new(journal: Journal, key: str, state: str, seq: int = 1) -> None:
    now = time.time()
    command = new_execution(key, now=now, command_id=seq, payment_id="p")
    journal.record(
        command,
        state,  # type: ignore[arg-type]  # a bare string, as a typo would come
        reason=None,
        now=now,
        dispatch=DispatchStamp(1, 0, seq) if state == S.DISPATCHING else None,
    )


def _move(journal: Journal, key: str, from_states: tuple[str, ...], to: str) -> bool:
    return journal.transition(
        key,
        from_states=from_states,
        to_state=to,
        now=time.time(),
        dispatch=DispatchStamp(1, 0, 1) if to == S.DISPATCHING else None,
    )


def _reach(journal: Journal, key: str, target: ExecutionState) -> None:
    first, *rest = _path_to(target)
    _new(journal, key, first)
    state = first
    for nxt in rest:
        assert _move(journal, key, (state,), nxt)
        state = nxt


def _history(journal: Journal, key: str) -> list[str]:
    return [h["state"] for h in journal.history(key)]


# -- the table itself ------------------------------------------------------------------


def test_the_table_has_a_row_for_every_state_and_names_only_states() -> None:
    assert set(TRANSITIONS) == set(ExecutionState)
    for targets in TRANSITIONS.values():
        assert targets <= set(ExecutionState)
    assert INITIAL_STATES <= set(ExecutionState)


def test_every_state_is_reachable_and_every_unfinished_one_can_still_end() -> None:
    for state in ExecutionState:
        _path_to(state)  # raises if unreachable
    # Promise 2: from anywhere that is not yet final, some move leads to a final state.
    for state in ExecutionState:
        if not (state in FINAL or is_final(state, awaits_start=True)):
            assert TRANSITIONS[state], state
    # A state with no move out is one the cloud was told is final.
    for state, targets in TRANSITIONS.items():
        if not targets:
            assert state in FINAL, state


def test_the_sets_partition_the_states_as_the_contract_says() -> None:
    assert ACTIVE | PENDING_START | FINAL == set(ExecutionState)
    assert not ACTIVE & FINAL and not ACTIVE & PENDING_START and not PENDING_START & FINAL
    assert AUTO_COMPENSATED < COMPENSATED <= FINAL
    assert COMPENSATED - AUTO_COMPENSATED == {S.NEEDS_REVIEW}  # a technician decides
    assert UNREPORTED <= ACTIVE
    # released: busy and not final while the start is awaited, the opposite without.
    assert not is_final(S.RELEASED, awaits_start=True)
    assert keeps_machine_busy(S.RELEASED, awaits_start=True)
    assert is_final(S.RELEASED, awaits_start=False)
    assert not keeps_machine_busy(S.RELEASED, awaits_start=False)
    for state in ExecutionState:
        assert not (
            is_final(state, awaits_start=True) and keeps_machine_busy(state, awaits_start=True)
        )


def test_the_journals_former_state_lists_are_the_lifecycles() -> None:
    assert set(journal_module.ACTIVE_STATES) == ACTIVE
    assert set(journal_module.FINAL_STATES) == FINAL | PENDING_START
    assert set(journal_module.COMPENSATION_STATES) == COMPENSATED
    assert set(journal_module.AUTO_COMPENSATION_STATES) == AUTO_COMPENSATED


def test_states_are_the_strings_stored_and_sent() -> None:
    assert [str(s) for s in ExecutionState] == [
        "accepted",
        "dispatching",
        "released",
        "started",
        "not_started",
        "completed",
        "failed",
        "rejected",
        "expired",
        "needs_review",
    ]
    assert f"transition:{S.NOT_STARTED}" == "transition:not_started"


# -- the journal keeps to it -----------------------------------------------------------


def test_every_move_of_the_table_is_one_the_journal_accepts(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    for i, (source, targets) in enumerate(TRANSITIONS.items()):
        for j, target in enumerate(sorted(targets)):
            key = f"k{i}-{j}"
            _reach(journal, key, source)
            assert _move(journal, key, (source,), target), (source, target)
            row = journal.get(key)
            assert row is not None and row.state == target
            assert _history(journal, key)[-1] == target


def test_every_first_state_of_the_table_is_one_the_journal_records(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    for state in INITIAL_STATES:
        _new(journal, f"k-{state}", state)
        row = journal.get(f"k-{state}")
        assert row is not None and row.state == state


@pytest.mark.parametrize("state", [*sorted(set(ALL) - INITIAL_STATES), TYPO])
def test_a_new_execution_in_a_state_it_cannot_start_in_is_refused(
    tmp_path: Path, state: str
) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    with pytest.raises(IllegalTransition, match=repr(str(state))) as refused:
        _new(journal, "k1", state)
    assert (refused.value.from_state, refused.value.to_state) == (None, state)
    assert journal.get("k1") is None
    assert journal.depth()["pending"] == 0  # nothing reported either


def test_a_move_outside_the_table_raises_and_writes_nothing(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    for source in ExecutionState:
        key = f"k-{source}"
        _reach(journal, key, source)
        history, depth = _history(journal, key), journal.depth()
        for target in [*ALL, TYPO]:
            if target in TRANSITIONS[source]:
                continue
            with pytest.raises(IllegalTransition, match="illegal transition") as refused:
                _move(journal, key, (source,), target)
            assert (refused.value.from_state, refused.value.to_state) == (source, target)
            # Refused whether or not the row is in that from-state: a bug, not a race.
            with pytest.raises(IllegalTransition):
                _move(journal, "no-such-key", (source,), target)
        with pytest.raises(IllegalTransition, match=TYPO):
            _move(journal, key, (TYPO,), S.EXPIRED)
        row = journal.get(key)
        assert row is not None and row.state == source
        assert (_history(journal, key), journal.depth()) == (history, depth)


def test_one_illegal_from_state_among_legal_ones_is_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    _new(journal, "k1", S.ACCEPTED)
    with pytest.raises(IllegalTransition, match="'completed' -> 'expired'"):
        _move(journal, "k1", (S.ACCEPTED, S.COMPLETED), S.EXPIRED)
    row = journal.get("k1")
    assert row is not None and row.state == S.ACCEPTED


def test_a_lost_race_is_not_an_illegal_move(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    _new(journal, "k1", S.DISPATCHING)
    assert _move(journal, "k1", (S.DISPATCHING,), S.RELEASED)
    assert not _move(journal, "k1", (S.DISPATCHING,), S.FAILED)  # already settled: False


def test_reads_refuse_a_state_that_does_not_exist(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    with pytest.raises(ValueError, match=TYPO):
        journal.in_states((S.RELEASED, TYPO))
    with pytest.raises(ValueError, match=TYPO):
        journal.note("k1", now=0.0, state=TYPO, detail="x")


@pytest.fixture(scope="module")
def shared_journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journal]:
    journal = Journal(tmp_path_factory.mktemp("lifecycle") / "j.db", "gw")
    yield journal
    journal.close()


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_random_moves_through_the_journal_never_leave_the_table(
    shared_journal: Journal, data: st.DataObject
) -> None:
    journal = shared_journal
    key = f"k{uuid.uuid4().hex}"
    state = data.draw(st.sampled_from(sorted(INITIAL_STATES)), "first")
    _new(journal, key, state)
    names = st.sampled_from([*ALL, TYPO])
    for _ in range(data.draw(st.integers(1, 10), "moves")):
        # Mostly moves the table has for this state, so walks go deep; any names else.
        onward = sorted(TRANSITIONS[state]) or ALL
        target = data.draw(st.one_of(st.sampled_from(onward), names))
        sources = sorted(s for s in ALL if target in TRANSITIONS[s]) or ALL
        from_states = tuple(
            data.draw(
                st.one_of(
                    st.just([state]),
                    st.lists(st.sampled_from(sources), min_size=1, max_size=3),
                    st.lists(names, min_size=1, max_size=3),
                )
            )
        )
        legal = target in TRANSITIONS and all(
            f in TRANSITIONS and target in TRANSITIONS[ExecutionState(f)] for f in from_states
        )
        if not legal:
            event("refused")
            with pytest.raises(IllegalTransition):
                _move(journal, key, from_states, target)
        elif _move(journal, key, from_states, target):
            event("moved")
            assert state in from_states
            state = ExecutionState(target)
        else:
            event("race lost")
            assert state not in from_states  # nothing changed
        row = journal.get(key)
        assert row is not None and row.state == state
    walk = _history(journal, key)
    event(f"ended {state}")
    assert walk[0] in INITIAL_STATES
    for before, after in zip(walk, walk[1:], strict=False):
        assert after in TRANSITIONS[ExecutionState(before)], walk


def test_the_readme_explains_exactly_the_lifecycles_states() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("| state | meaning | what to do |")
    rows = []
    for line in readme[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip("|").split("|")[0].strip().strip("`"))
    assert rows == [str(s) for s in ExecutionState]  # each once, in the lifecycle's order


def test_a_move_from_nowhere_is_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", "gw")
    _new(journal, "k1", S.ACCEPTED)
    with pytest.raises(ValueError, match="at least one from-state"):
        _move(journal, "k1", (), S.EXPIRED)
