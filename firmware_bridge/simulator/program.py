"""The simulator program: ``python -m firmware_bridge.simulator`` and its options.

Serves a ``SimulatedBoard`` on a pty (``pty_link``) so the real host driver, the
gateway and the benchmarks talk to it exactly as to the MCU::

    python -m firmware_bridge.simulator --actuations FILE [--link PATH]
        [--scenario JSON] [--channels N] [--boot-id HEX] [--time-scale F]
        [--edges FILE] [--machine SPEC]... [--machine-time-scale K]
        [--stuck-relay CH]... [--no-relay-sense] [--drop-rate P] [--corrupt-rate P]
        [--delay-ms N] [--seed S] [--reboot-mid-train N] [--drop-release-acks N]
        [--ring-size N] [--firmware 1.1|1.2] [--control SOCKET]

stdout carries exactly one line, ``PTY <slave path>``. The actuations FILE gets
one JSON line per executed release, fsync'ed before the RELEASE_ACK leaves, so a
test can count physical releases even when acks are lost; the edges FILE one
JSON line per relay edge. stderr tells ``BOOT <id>``, ``REBOOT <id>``,
``UNPLUG`` and ``PLUG <pty path> <boot id>``. Signals and the control socket:
see ``pty_link``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from firmware_bridge.simulator.board import FIRMWARES, RING_SIZE, Faults, SimulatedBoard
from firmware_bridge.simulator.pty_link import PtyPort, serve
from firmware_bridge.simulator.records import Actuation, Edge
from firmware_bridge.simulator.scenario import load_scenario, machine_spec

__all__ = ["main"]


class _JsonLines:
    """Append-only JSON lines; ``durable`` fsyncs each (actuations: before the ACK)."""

    def __init__(self, path: str, *, durable: bool) -> None:
        self._file: IO[str] = open(path, "a", encoding="utf-8")
        self._durable = durable

    def write(self, line: Mapping[str, object]) -> None:
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._durable:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _actuation_line(actuation: Actuation) -> dict[str, object]:
    line: dict[str, object] = {
        "time": time.time(),
        "rx_monotonic": actuation.rx_monotonic,
        "boot_id": f"{actuation.boot_id:08x}",
        "command_id": f"{actuation.command_id:016x}",
        "channel": actuation.channel,
        "kind": actuation.kind,
        "pulse_count": actuation.pulse_count,
        "on_ms": actuation.on_ms,
        "off_ms": actuation.off_ms,
    }
    if actuation.kind == "level":
        line["hold_ms"] = actuation.hold_ms
    return line


def _edge_line(edge: Edge) -> dict[str, object]:
    return {
        "monotonic": edge.monotonic,
        "channel": edge.channel,
        "state": "on" if edge.on else "off",
        "command_id": None if edge.command_id is None else f"{edge.command_id:016x}",
    }


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a rate is 0..1")
    return value


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge.simulator",
        description="Serve a simulated relay board (protocol v1) on a pty.",
        epilog="Options given on the command line override the scenario file; "
        "machines and stuck relays from both are combined.",
    )
    parser.add_argument("--actuations", required=True, metavar="FILE",
                        help="append one JSON line per executed release (fsync'ed)")
    parser.add_argument("--link", metavar="PATH",
                        help="create/replace a symlink PATH -> pty slave")
    parser.add_argument("--scenario", metavar="FILE",
                        help="JSON object with any of the options below (underscores)")
    parser.add_argument("--channels", type=int, metavar="N", help="relay channels (8)")
    parser.add_argument("--drop-release-acks", type=int, metavar="N",
                        help="act on the first N releases but do not send their ACK")
    parser.add_argument("--boot-id", type=lambda s: int(s, 16), metavar="HEX",
                        help="initial boot id (default random)")
    parser.add_argument("--time-scale", type=float, metavar="F",
                        help="relay timing factor; 1 = real time, 0 = instantaneous (default)")
    parser.add_argument("--edges", metavar="FILE", help="append one JSON line per relay edge")
    parser.add_argument("--machine", action="append", metavar="SPEC",
                        help="e.g. channel=1,input=1,start_ms=300,run_ms=2000[,never_starts]"
                        "[,late_ms=N][,coins=N][,level][,minutes_per_pulse=M][,active_low];"
                        " repeatable")
    parser.add_argument("--machine-time-scale", type=float, metavar="K",
                        help="machine timings are divided by K (default 1)")
    parser.add_argument("--stuck-relay", type=int, action="append", metavar="CH",
                        help="channel CH's contact is sensed closed always; repeatable")
    parser.add_argument("--no-relay-sense", action="store_true", default=None,
                        help="the board cannot sense its contacts (INPUTS flags bit0 = 0)")
    parser.add_argument("--drop-rate", type=_rate, metavar="P",
                        help="lose each received frame and each reply with probability P")
    parser.add_argument("--corrupt-rate", type=_rate, metavar="P",
                        help="flip a bit in a byte of each reply with probability P")
    parser.add_argument("--delay-ms", type=int, metavar="N", help="delay every reply by N ms")
    parser.add_argument("--seed", type=int, metavar="S", help="seed of the fault generator")
    parser.add_argument("--reboot-mid-train", type=int, metavar="N",
                        help="reboot in the middle of the Nth pulse train (after its ACK)")
    parser.add_argument("--ring-size", type=int, metavar="N",
                        help=f"command ids remembered per boot ({RING_SIZE}); real firmware "
                        "keeps >= 32, fewer only to test forgetting")
    parser.add_argument("--firmware", choices=FIRMWARES,
                        help="answer as this firmware (1.2); 1.1: no exec_count/ring_size, "
                        "the short PONG, RELEASE_ACK and QUERY_REPLY")
    parser.add_argument("--control", metavar="SOCKET",
                        help="Unix socket taking 'input N high|low|auto' lines (force an "
                        "input's raw level / give it back to its machines); answers 'ok'")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario) if args.scenario else {}
        defaults: dict[str, Any] = {
            "channels": 8, "drop_release_acks": 0, "boot_id": None, "time_scale": 0.0,
            "edges": None, "machine_time_scale": 1.0, "no_relay_sense": False,
            "drop_rate": 0.0, "corrupt_rate": 0.0, "delay_ms": 0, "seed": None,
            "reboot_mid_train": 0, "ring_size": RING_SIZE, "firmware": FIRMWARES[-1],
        }
        for key, default in defaults.items():
            if getattr(args, key) is None:
                value = scenario.get(key, default)
                if key == "boot_id" and isinstance(value, str):
                    value = int(value, 16)
                setattr(args, key, value)
        items = list(scenario.get("machine", [])) + list(scenario.get("machines", []))
        args.machines = [machine_spec(m) for m in items + (args.machine or [])]
        stuck = scenario.get("stuck_relay", [])
        args.stuck_relays = frozenset(
            ([stuck] if isinstance(stuck, int) else list(stuck)) + (args.stuck_relay or [])
        )
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    if not 1 <= args.channels <= 255:
        parser.error("--channels must be 1..255")
    if not 1 <= args.ring_size <= 0xFFFF or str(args.firmware) not in FIRMWARES:
        parser.error(f"--ring-size must be 1..65535 and --firmware one of {FIRMWARES}")
    args.firmware = str(args.firmware)
    if args.boot_id is not None and not 0 < args.boot_id <= 0xFFFFFFFF:
        parser.error("--boot-id must be a non-zero u32")
    if args.time_scale < 0 or args.machine_time_scale <= 0 or args.delay_ms < 0:
        parser.error("--time-scale and --delay-ms must be >= 0, --machine-time-scale > 0")
    if not all(0 <= r <= 1 for r in (args.drop_rate, args.corrupt_rate)):
        parser.error("rates are 0..1")
    if any(not 1 <= c <= args.channels for c in args.stuck_relays):
        parser.error("--stuck-relay must name a channel 1..N")
    if any(not 1 <= m.channel <= args.channels for m in args.machines):
        parser.error("a machine's channel must be 1..N")
    return args



def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="simulator: %(levelname)s %(message)s")
    port = PtyPort(args.link)
    port.plug()
    print(f"PTY {port.path}", flush=True)
    actuations = _JsonLines(args.actuations, durable=True)
    edges = _JsonLines(args.edges, durable=False) if args.edges else None
    board = SimulatedBoard(
        channels=args.channels,
        boot_id=args.boot_id,
        on_actuation=lambda a: actuations.write(_actuation_line(a)),
        on_edge=(lambda e: edges.write(_edge_line(e))) if edges else None,
        on_reboot=lambda b: print(f"REBOOT {b:08x}", file=sys.stderr, flush=True),
        drop_release_acks=args.drop_release_acks,
        time_scale=args.time_scale,
        machines=args.machines,
        machine_time_scale=args.machine_time_scale,
        faults=Faults(
            drop_rate=args.drop_rate,
            corrupt_rate=args.corrupt_rate,
            seed=args.seed,
            stuck_relays=args.stuck_relays,
            reboot_mid_train=args.reboot_mid_train,
        ),
        sense_relays=not args.no_relay_sense,
        ring_size=args.ring_size,
        firmware=args.firmware,
    )
    print(f"BOOT {board.boot_id:08x}", file=sys.stderr, flush=True)
    try:
        asyncio.run(serve(port, board, args.delay_ms / 1000, args.control))
    finally:
        actuations.close()
        if edges is not None:
            edges.close()
        port.unplug()
    return 0

