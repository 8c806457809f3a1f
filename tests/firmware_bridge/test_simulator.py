"""The sans-I/O simulated board keeps the board's promises (docs/firmware-protocol.md)."""

from __future__ import annotations

import pytest

from firmware_bridge.driver import MAX_HOLD_MS, MIN_HOLD_MS, ring_vouches
from firmware_bridge.frames import (
    AllOff,
    AllOffAck,
    Frame,
    FrameDecoder,
    Inputs,
    Message,
    Nack,
    NackReason,
    Ping,
    Pong,
    Query,
    QueryReply,
    ReadInputs,
    Release,
    ReleaseAck,
    ReleaseLevel,
    decode,
    encode,
)
from firmware_bridge.simulator import (
    FW_MAJOR,
    FW_MINOR,
    RING_SIZE,
    Actuation,
    Edge,
    Faults,
    MachineSpec,
    SimulatedBoard,
)


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
    assert h.request(Ping()) == Pong(0xCAFE, FW_MAJOR, FW_MINOR, 4, 0, RING_SIZE)


def test_duplicate_release_never_pulses_twice() -> None:
    h = Harness(boot_id=7)
    release = Release(42, 1, 2, 100, 100)
    assert h.request(release, seq=1) == ReleaseAck(7, 42, duplicate=False, exec_count=1)
    assert h.request(release, seq=1) == ReleaseAck(7, 42, duplicate=True, exec_count=1)
    assert h.request(release, seq=2) == ReleaseAck(7, 42, duplicate=True, exec_count=1)
    assert len(h.actuations) == 1


def test_dropped_ack_still_acts_once_and_retransmission_is_duplicate() -> None:
    h = Harness(drop_release_acks=1)
    release = Release(42, 1, 1, 100, 100)
    assert h.send(encode(release, 9)) == []
    assert h.request(release, seq=9) == ReleaseAck(h.board.boot_id, 42, True, exec_count=1)
    assert len(h.actuations) == 1


def test_reboot_forgets_executed_commands_and_changes_boot_id() -> None:
    h = Harness()
    h.request(Release(42, 1, 1, 100, 100))
    old = h.board.boot_id
    assert h.request(Query(42)) == QueryReply(old, 42, executed=True, exec_count=1)
    new = h.board.reboot()
    assert new not in (0, old)
    assert h.request(Query(42)) == QueryReply(new, 42, executed=False, exec_count=0)


def test_ring_remembers_at_least_32_commands() -> None:
    h = Harness()
    for command_id in range(RING_SIZE):
        h.request(Release(command_id, 1, 1, 10, 10))
    assert RING_SIZE >= 32
    assert h.request(Query(0)) == QueryReply(h.board.boot_id, 0, True, exec_count=RING_SIZE)


def test_query_cannot_vouch_for_an_id_the_ring_forgot() -> None:
    # Issue 7: the host knew count 0, then 5 releases ran through a ring of 4.
    h = Harness(ring_size=4)
    pong = h.request(Ping())
    assert isinstance(pong, Pong) and (pong.exec_count, pong.ring_size) == (0, 4)
    acks = [h.request(Release(command_id, 1, 1, 10, 10)) for command_id in range(1, 6)]
    assert [a.exec_count for a in acks if isinstance(a, ReleaseAck)] == [1, 2, 3, 4, 5]
    forgotten = h.request(Query(1))
    assert forgotten == QueryReply(h.board.boot_id, 1, executed=False, exec_count=5)
    assert not ring_vouches(
        reply_exec_count=forgotten.exec_count, dispatch_exec_count=0, ring_size=pong.ring_size
    )
    assert h.request(Query(2)) == QueryReply(h.board.boot_id, 2, executed=True, exec_count=5)
    # A count learned after the first release still covers "never sent" ids.
    assert ring_vouches(reply_exec_count=5, dispatch_exec_count=1, ring_size=4)


def test_exec_count_counts_recorded_releases_only_and_restarts_at_reset() -> None:
    h = Harness(time_scale=1.0)
    assert h.request(Release(1, 1, 1, 100, 100)) == ReleaseAck(h.board.boot_id, 1, False, 1)
    assert h.request(Release(1, 1, 1, 100, 100)) == ReleaseAck(h.board.boot_id, 1, True, 1)
    assert isinstance(h.request(Release(2, 1, 1, 100, 100)), Nack)  # channel busy
    assert isinstance(h.request(Release(3, 99, 1, 100, 100)), Nack)  # bad channel
    assert h.request(AllOff()) == AllOffAck(h.board.boot_id)
    assert h.request(Query(2)) == QueryReply(h.board.boot_id, 2, False, exec_count=1)
    h.board.reboot(0.0)
    assert h.request(Ping()) == Pong(h.board.boot_id, FW_MAJOR, FW_MINOR, 8, 0, RING_SIZE)


def test_firmware_1_1_answers_the_short_forms_without_counts() -> None:
    h = Harness(firmware="1.1", boot_id=9)
    decoder = FrameDecoder()
    lengths = {}
    for message in (Ping(), Release(1, 1, 1, 10, 10), Release(1, 1, 1, 10, 10), Query(1)):
        (frame,) = decoder.feed(h.board.feed(encode(message, 1), 0.0))
        lengths[frame.type] = len(frame.payload)
        reply = decode(frame)
        assert getattr(reply, "exec_count", None) is None
    assert lengths == {0x81: 7, 0x82: 13, 0x83: 13}
    assert h.request(Ping()) == Pong(9, FW_MAJOR, 1, 8)


def test_simulator_refuses_an_empty_ring_and_unknown_firmware() -> None:
    with pytest.raises(ValueError):
        SimulatedBoard(ring_size=0)
    with pytest.raises(ValueError):
        SimulatedBoard(firmware="1.0")


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
    assert h.request(Query(1)) == QueryReply(h.board.boot_id, 1, executed=False, exec_count=0)


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
        h.board.boot_id, 1, False, 1
    )  # train lasts 2 * 250 ms
    busy = h.request(Release(2, 1, 1, 100, 100), now=10.4)
    assert busy == Nack(h.board.boot_id, 0x02, NackReason.CHANNEL_BUSY)
    # Its own retransmission is a duplicate, not busy; another channel is free.
    boot = h.board.boot_id
    assert h.request(Release(1, 1, 2, 100, 150), now=10.4) == ReleaseAck(boot, 1, True, 1)
    assert isinstance(h.request(Release(3, 2, 1, 100, 100), now=10.4), ReleaseAck)
    assert h.request(Release(2, 1, 1, 100, 100), now=10.5) == ReleaseAck(boot, 2, False, 3)
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
    assert h.request(Ping()) == Pong(h.board.boot_id, FW_MAJOR, FW_MINOR, 8, 0, RING_SIZE)


def test_actuation_reports_time_of_read_with_first_byte() -> None:
    h = Harness()
    frame = encode(Release(5, 1, 1, 100, 100), 1)
    assert h.board.feed(b"junk" + frame[:3], 100.0) == b""
    assert h.board.feed(frame[3:], 101.0) != b""
    assert h.actuations[0].rx_monotonic == 100.0


# --- firmware 1.1: level holds, ALL_OFF, READ_INPUTS; machines and faults ---------


class Clocked(Harness):
    """A harness that records relay edges and can let time pass."""

    def __init__(self, **kwargs: object) -> None:
        self.edges: list[Edge] = []
        super().__init__(on_edge=self.edges.append, **kwargs)

    def send(self, data: bytes, now: float = 0.0) -> list[Message]:
        replies = super().send(data, now)
        self.board.advance(now)  # as the pty runner does right after each read
        return replies

    def inputs(self, now: float) -> Inputs:
        reply = self.request(ReadInputs(), now=now)
        assert isinstance(reply, Inputs)
        return reply


@pytest.mark.parametrize("hold_ms", [MIN_HOLD_MS - 1, MAX_HOLD_MS + 1])
def test_level_hold_out_of_range_is_nacked(hold_ms: int) -> None:
    h = Clocked()
    nack = Nack(h.board.boot_id, 0x04, NackReason.BAD_PARAMS)
    assert h.request(ReleaseLevel(1, 1, hold_ms)) == nack
    assert h.actuations == [] and h.edges == []


def test_level_release_shares_the_ring_with_pulse_releases() -> None:
    h = Clocked(time_scale=1.0)
    assert h.request(ReleaseLevel(1, 2, 500), now=1.0) == ReleaseAck(h.board.boot_id, 1, False, 1)
    assert h.request(Release(1, 2, 1, 100, 100), now=1.1) == ReleaseAck(h.board.boot_id, 1, True, 1)
    assert h.request(ReleaseLevel(2, 2, 500), now=1.2) == Nack(
        h.board.boot_id, 0x04, NackReason.CHANNEL_BUSY
    )
    assert h.inputs(1.3).relays == 0b10
    h.board.advance(1.5)
    assert h.inputs(1.6).relays == 0
    assert [(e.channel, e.on, e.monotonic) for e in h.edges] == [(2, True, 1.0), (2, False, 1.5)]
    (actuation,) = h.actuations
    assert (actuation.kind, actuation.hold_ms) == ("level", 500)


def test_all_off_opens_every_contact_and_frees_channels() -> None:
    h = Clocked(time_scale=1.0)
    h.request(Release(1, 1, 10, 100, 100), now=0.0)
    h.request(ReleaseLevel(2, 3, 10_000), now=0.0)
    assert h.request(AllOff(), now=0.05) == AllOffAck(h.board.boot_id)
    assert h.board.relays == 0 and h.board.next_deadline() is None
    assert h.request(Query(1), now=0.06) == QueryReply(h.board.boot_id, 1, True, exec_count=2)
    assert isinstance(h.request(Release(3, 1, 1, 100, 100), now=0.07), ReleaseAck)


def test_instantaneous_train_edges_complete_on_advance() -> None:
    edges: list[Edge] = []
    board = SimulatedBoard(on_edge=edges.append)
    assert board.feed(encode(Release(1, 4, 3, 100, 100), 1), 5.0)
    assert [e.on for e in edges] == [True]  # first edge before the ACK
    assert board.next_deadline() == 5.0
    board.advance(5.0)
    assert [e.on for e in edges] == [True, False] * 3


def test_machines_start_after_start_ms_and_stop_after_run_ms() -> None:
    h = Clocked(
        machines=[
            MachineSpec.parse("channel=1,input=1,start_ms=300,run_ms=2000"),
            MachineSpec.parse("channel=2,input=2,never_starts"),
            MachineSpec.parse("channel=3,input=3,late_ms=5000,run_ms=1000"),
        ],
        machine_time_scale=1.0,
    )
    for channel in (1, 2, 3):
        h.request(Release(channel, channel, 1, 100, 100), now=10.0)
    h.board.advance(10.0)
    assert h.inputs(10.29).inputs == 0
    assert h.inputs(10.3).inputs == 0b001
    assert h.inputs(12.29).inputs == 0b001
    assert h.inputs(12.3).inputs == 0
    assert h.inputs(15.0).inputs == 0b100  # late start
    assert h.inputs(16.0).inputs == 0
    assert h.inputs(100.0).inputs == 0  # never started


def test_machine_needs_its_coins_in_one_train() -> None:
    h = Clocked(machines=[MachineSpec.parse("channel=1,input=5,coins=3,start_ms=0")])
    h.request(Release(1, 1, 2, 100, 100), now=0.0)
    h.request(Release(2, 1, 2, 100, 100), now=1.0)  # 2 + 2 coins, but in two trains
    assert h.inputs(1.5).inputs == 0
    h.request(Release(3, 1, 3, 100, 100), now=2.0)
    assert h.inputs(2.0).inputs == 1 << 4


def test_level_machine_needs_a_long_enough_enable() -> None:
    h = Clocked(
        time_scale=1.0,
        machines=[
            MachineSpec.from_dict(
                {"channel": 1, "input": 1, "level": True, "start_ms": 0, "run_ms": 1000}
            )
        ],
    )
    h.request(Release(1, 1, 1, 50, 50), now=0.0)  # a 50 ms coin is not an enable
    assert h.inputs(0.2).inputs == 0
    h.request(ReleaseLevel(2, 1, 100), now=1.0)
    assert h.inputs(1.05).inputs == 0  # still held
    assert h.inputs(1.1).inputs == 1
    assert h.inputs(2.1).inputs == 0


def test_dryer_top_up_extends_the_run_and_time_scale_compresses_it() -> None:
    h = Clocked(
        machines=[
            MachineSpec.parse("channel=2,input=2,start_ms=0,run_ms=2400000,minutes_per_pulse=10")
        ],
        machine_time_scale=1200.0,  # 40 min -> 2 s; 10 min -> 0.5 s
    )
    h.request(Release(1, 2, 1, 100, 100), now=0.0)
    assert h.inputs(0.0).inputs == 0b10
    h.request(Release(2, 2, 2, 100, 100), now=1.0)  # top-up: + 2 x 10 min
    assert h.inputs(2.9).inputs == 0b10
    assert h.inputs(3.0).inputs == 0


def test_stuck_relay_reads_closed_while_commanded_open() -> None:
    h = Clocked(faults=Faults(stuck_relays=frozenset({2})))
    reply = h.inputs(0.0)
    assert (reply.relays, reply.relays_sensed) == (0b10, True)
    assert h.board.relays == 0
    unsensed = Clocked(sense_relays=False).inputs(0.0)
    assert (unsensed.relays, unsensed.relays_sensed) == (0, False)


def test_reboot_mid_train_acks_then_forgets_and_opens_the_contact() -> None:
    h = Clocked(faults=Faults(reboot_mid_train=2))
    h.request(Release(1, 1, 1, 100, 100))
    old = h.board.boot_id
    assert h.request(Release(2, 1, 3, 100, 100)) == ReleaseAck(old, 2, False, exec_count=2)
    h.board.advance(0.0)
    assert h.board.boot_id != old
    assert h.request(Query(2)) == QueryReply(h.board.boot_id, 2, False, exec_count=0)
    assert [e.on for e in h.edges if e.command_id == 2] == [True, False, True, False]
    assert h.board.relays == 0


def test_faults_are_reproducible_with_a_seed() -> None:
    def replies(seed: int) -> list[bytes]:
        board = SimulatedBoard(boot_id=1, faults=Faults(drop_rate=0.3, corrupt_rate=0.3, seed=seed))
        return [board.feed(encode(Ping(), seq), 0.0) for seq in range(50)]

    first = replies(3)
    assert first == replies(3)
    good = [encode(Pong(1, FW_MAJOR, FW_MINOR, 8, 0, RING_SIZE), seq) for seq in range(50)]
    assert sum(r == b"" for r in first) > 5  # dropped
    assert sum(r not in (b"", g) for r, g in zip(first, good, strict=True)) > 5  # corrupted


def test_active_low_machine_input_is_high_when_idle_and_low_while_running() -> None:
    spec = MachineSpec.parse("channel=1,input=3,start_ms=300,run_ms=2000,active_low")
    assert spec.active_low
    assert MachineSpec.from_dict({"channel": 1, "input": 3, "active_low": True}).active_low
    h = Clocked(
        machines=[spec, MachineSpec.parse("channel=2,input=1,start_ms=300,run_ms=2000")],
    )
    assert h.inputs(0.0).inputs == 0b100  # idle: the active-low line rests high
    h.request(Release(1, 1, 1, 100, 100), now=10.0)
    assert h.inputs(10.29).inputs == 0b100
    assert h.inputs(10.3).inputs == 0  # running: pulled low
    assert h.inputs(12.29).inputs == 0
    assert h.inputs(12.3).inputs == 0b100  # idle again
    h.request(Release(2, 2, 1, 100, 100), now=20.0)  # the active-high one beside it
    assert h.inputs(20.3).inputs == 0b101


def test_forced_input_overrides_machines_until_handed_back() -> None:
    h = Clocked(machines=[MachineSpec.parse("channel=1,input=2,start_ms=0,run_ms=1000")])
    h.board.force_input(1, True)
    h.board.force_input(3, True)
    assert h.inputs(0.0).inputs == 0b101
    h.request(Release(1, 1, 1, 100, 100), now=1.0)
    h.board.force_input(2, False)  # the machine runs, but the wire reads low
    assert h.inputs(1.0).inputs == 0b101
    h.board.force_input(2, None)
    assert h.inputs(1.0).inputs == 0b111
    h.board.reboot(1.5)  # the wire, not the board: survives a reset
    h.board.force_input(1, None)
    assert h.inputs(3.0).inputs == 0b100
    with pytest.raises(ValueError):
        h.board.force_input(65, True)
