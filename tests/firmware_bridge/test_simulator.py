"""The sans-I/O simulated board keeps the board's promises (docs/firmware-protocol.md)."""

from __future__ import annotations

import pytest

from firmware_bridge.frames import (
    Frame,
    FrameDecoder,
    Message,
    Nack,
    NackReason,
    Ping,
    Pong,
    Query,
    QueryReply,
    Release,
    ReleaseAck,
    decode,
    encode,
)
from firmware_bridge.simulator import RING_SIZE, Actuation, SimulatedBoard


class Harness:
    def __init__(self, **kwargs: object) -> None:
        self.actuations: list[Actuation] = []
        self.board = SimulatedBoard(on_actuation=self.actuations.append, **kwargs)  # type: ignore[arg-type]
        self.decoder = FrameDecoder()

    def send(self, data: bytes, now: float = 0.0) -> list[Message]:
        return [decode(f) for f in self.decoder.feed(self.board.feed(data, now))]

    def request(self, message: Message, seq: int = 1, now: float = 0.0) -> Message:
        (reply,) = self.send(encode(message, seq), now)
        return reply


def test_ping_answers_boot_id_and_channels() -> None:
    h = Harness(channels=4, boot_id=0xCAFE)
    assert h.request(Ping()) == Pong(0xCAFE, 1, 0, 4)


def test_duplicate_release_never_pulses_twice() -> None:
    h = Harness(boot_id=7)
    release = Release(42, 1, 2, 100, 100)
    assert h.request(release, seq=1) == ReleaseAck(7, 42, duplicate=False)
    assert h.request(release, seq=1) == ReleaseAck(7, 42, duplicate=True)
    assert h.request(release, seq=2) == ReleaseAck(7, 42, duplicate=True)
    assert len(h.actuations) == 1


def test_dropped_ack_still_acts_once_and_retransmission_is_duplicate() -> None:
    h = Harness(drop_release_acks=1)
    release = Release(42, 1, 1, 100, 100)
    assert h.send(encode(release, 9)) == []
    assert h.request(release, seq=9) == ReleaseAck(h.board.boot_id, 42, duplicate=True)
    assert len(h.actuations) == 1


def test_reboot_forgets_executed_commands_and_changes_boot_id() -> None:
    h = Harness()
    h.request(Release(42, 1, 1, 100, 100))
    old = h.board.boot_id
    assert h.request(Query(42)) == QueryReply(old, 42, executed=True)
    new = h.board.reboot()
    assert new not in (0, old)
    assert h.request(Query(42)) == QueryReply(new, 42, executed=False)


def test_ring_remembers_at_least_32_commands() -> None:
    h = Harness()
    for command_id in range(RING_SIZE):
        h.request(Release(command_id, 1, 1, 10, 10))
    assert RING_SIZE >= 32
    assert h.request(Query(0)) == QueryReply(h.board.boot_id, 0, executed=True)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Release(1, 0, 1, 100, 100), NackReason.BAD_CHANNEL),
        (Release(1, 9, 1, 100, 100), NackReason.BAD_CHANNEL),
        (Release(1, 1, 0, 100, 100), NackReason.BAD_PARAMS),
        (Release(1, 1, 51, 100, 100), NackReason.BAD_PARAMS),
        (Release(1, 1, 1, 9, 100), NackReason.BAD_PARAMS),
        (Release(1, 1, 1, 100, 5001), NackReason.BAD_PARAMS),
    ],
)
def test_invalid_release_is_nacked_and_never_pulses(message: Release, reason: NackReason) -> None:
    h = Harness()
    assert h.request(message) == Nack(h.board.boot_id, 0x02, reason)
    assert h.actuations == []
    assert h.request(Query(1)) == QueryReply(h.board.boot_id, 1, executed=False)


def test_bad_length_and_unknown_type_are_nacked() -> None:
    h = Harness()
    (reply,) = h.send(Frame(0x02, 3, b"\x00" * 13).serialize())
    assert reply == Nack(h.board.boot_id, 0x02, NackReason.BAD_LENGTH)
    (reply,) = h.send(Frame(0x81, 4, b"").serialize())
    assert reply == Nack(h.board.boot_id, 0x81, NackReason.UNKNOWN_TYPE)
    assert h.actuations == []


def test_busy_channel_is_nacked_until_its_pulse_train_ends() -> None:
    h = Harness(time_scale=1.0)
    assert h.request(Release(1, 1, 2, 100, 150), now=10.0) == ReleaseAck(
        h.board.boot_id, 1, False
    )  # train lasts 2 * 250 ms
    busy = h.request(Release(2, 1, 1, 100, 100), now=10.4)
    assert busy == Nack(h.board.boot_id, 0x02, NackReason.CHANNEL_BUSY)
    # Its own retransmission is a duplicate, not busy; another channel is free.
    assert h.request(Release(1, 1, 2, 100, 150), now=10.4) == ReleaseAck(
        h.board.boot_id, 1, True
    )
    assert isinstance(h.request(Release(3, 2, 1, 100, 100), now=10.4), ReleaseAck)
    assert h.request(Release(2, 1, 1, 100, 100), now=10.5) == ReleaseAck(
        h.board.boot_id, 2, False
    )
    assert [a.command_id for a in h.actuations] == [1, 3, 2]


def test_corrupt_frames_are_dropped_without_reply_or_crash() -> None:
    h = Harness()
    good = encode(Release(5, 1, 1, 100, 100), 1)
    for i in range(1, len(good)):  # every single-bit-flip of every byte after SOF
        for bit in range(8):
            corrupt = bytearray(good)
            corrupt[i] ^= 1 << bit
            assert h.send(bytes(corrupt) + b"\x00" * 80) == []
    assert h.actuations == []
    assert h.request(Ping()) == Pong(h.board.boot_id, 1, 0, 8)


def test_actuation_reports_time_of_read_with_first_byte() -> None:
    h = Harness()
    frame = encode(Release(5, 1, 1, 100, 100), 1)
    assert h.board.feed(b"junk" + frame[:3], 100.0) == b""
    assert h.board.feed(frame[3:], 101.0) != b""
    assert h.actuations[0].rx_monotonic == 100.0
