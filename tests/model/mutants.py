"""The fixes the model must notice when they are reverted, each as a mutant.

Each is a context manager that puts back the bug a fix removed, in the running code,
so tests can show that the model's counterexamples still exercise the fix:
with the mutant the sequence fails, without it the sequence passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from firmware_bridge.driver import Program
from firmware_bridge.exceptions import BoardNoReply
from firmware_bridge.frames import Release, ReleaseAck
from firmware_bridge.serial_board import SerialBoard
from gateway import dispatch
from gateway.intake import Intake

__all__ = ["MUTANTS"]


@contextlib.contextmanager
def _verdict_mutant(wrong: dispatch.Verdict) -> Iterator[None]:
    real = dispatch.query_verdict

    def mutant(*args, **kwargs):  # type: ignore[no-untyped-def]
        verdict = real(*args, **kwargs)
        return dispatch.Verdict.NEVER_RAN if verdict is wrong else verdict

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "query_verdict", mutant)
        yield


@contextlib.contextmanager
def ring_check_removed() -> Iterator[None]:
    """The disk-full double release: "not executed, same boot" taken for proof even
    when the board has executed more releases since than its ring holds."""
    with _verdict_mutant(dispatch.Verdict.MAY_BE_FORGOTTEN):
        yield


@contextlib.contextmanager
def resend_after_board_reset() -> Iterator[None]:
    """Recovery re-dispatching a release in doubt after the board reset (both guards:
    the verdict on the QUERY answer, and the worker's check of the boot)."""
    with _verdict_mutant(dispatch.Verdict.BOARD_RESET), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch.Dispatch, "_same_boot", staticmethod(lambda row, boot_id: True))
        yield


@contextlib.contextmanager
def duplicate_check_removed() -> Iterator[None]:
    """Intake not looking up the execute_key before deciding."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Intake, "_stored", lambda self, key: None)
        yield


@contextlib.contextmanager
def blind_retransmit() -> Iterator[None]:
    """The serial driver re-sending an unacknowledged release without asking QUERY."""

    async def release(self: SerialBoard, command_id: int, channel: int, program: Program):  # type: ignore[no-untyped-def]
        request = Release(command_id, channel, program.count, program.on_ms, program.off_ms)  # type: ignore[union-attr]
        async with self._lock:  # noqa: SLF001
            for attempt in range(1 + self._max_retries):  # noqa: SLF001
                ack = await self._exchange(request, ReleaseAck, 1, written_before=attempt > 0)  # noqa: SLF001
                if ack is not None:
                    return ack
        raise BoardNoReply("no ack")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SerialBoard, "release", release)
        yield


MUTANTS = {
    "ring_check_removed": ring_check_removed,
    "resend_after_board_reset": resend_after_board_reset,
    "duplicate_check_removed": duplicate_check_removed,
    "blind_retransmit": blind_retransmit,
}
