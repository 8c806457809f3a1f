"""A simulated relay board: the other side of protocol v1, shipped as a feature.

Its protocol logic is sans-I/O, apart from the ways of connecting it to a host:

- ``board``: ``SimulatedBoard``, the board rules of docs/firmware-protocol.md (boot
  id, ring, execution count, NACKs, faults): received bytes and a clock in, reply
  bytes out; what it did (``records``: ``Actuation``, ``Edge``) reported to listeners;
- ``machines``: the washers and dryers wired to its relays and busy inputs;
- ``scenario``: scenario files (the program's options as JSON);
- ``timer``: runs the board's deadlines on an asyncio loop;
- ``pty_link`` + ``program``: the board on a pty, the ``python -m
  firmware_bridge.simulator`` program (options, signals, control socket, record files);
- ``memory_link``: the board on an in-memory serial link in the host's own event
  loop, for in-process tests of ``SerialBoard`` and what is built on it.
"""

from firmware_bridge.simulator.board import (
    FIRMWARES,
    FW_MAJOR,
    FW_MINOR,
    RING_SIZE,
    Faults,
    SimulatedBoard,
)
from firmware_bridge.simulator.machines import MachineSpec
from firmware_bridge.simulator.memory_link import MemoryLink
from firmware_bridge.simulator.records import Actuation, Edge
from firmware_bridge.simulator.scenario import load_scenario

__all__ = [
    "FIRMWARES",
    "FW_MAJOR",
    "FW_MINOR",
    "RING_SIZE",
    "Actuation",
    "Edge",
    "Faults",
    "MachineSpec",
    "MemoryLink",
    "SimulatedBoard",
    "load_scenario",
]
