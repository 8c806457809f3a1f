"""Relay board bridge: protocol v1 codec (frames), serial driver, simulated board.

Never imports gateway or cloud_sync (DESIGN.md "Layout"). The wire protocol is
specified in docs/firmware-protocol.md.
"""

from firmware_bridge.driver import (
    BoardDriver,
    InputState,
    LevelHold,
    Program,
    PulseTrain,
    ring_vouches,
)
from firmware_bridge.exceptions import (
    BoardError,
    BoardNack,
    BoardNoReply,
    BoardUnavailable,
    IncompleteFrame,
    InvalidFrame,
    ProtocolError,
)
from firmware_bridge.frames import NackReason, Pong, QueryReply, ReleaseAck
from firmware_bridge.serial_board import SerialBoard

__all__ = [
    "BoardDriver",
    "BoardError",
    "BoardNack",
    "BoardNoReply",
    "BoardUnavailable",
    "IncompleteFrame",
    "InputState",
    "InvalidFrame",
    "LevelHold",
    "NackReason",
    "Pong",
    "Program",
    "ProtocolError",
    "PulseTrain",
    "QueryReply",
    "ReleaseAck",
    "SerialBoard",
    "ring_vouches",
]
