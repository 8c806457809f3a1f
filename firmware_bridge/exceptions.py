"""Errors of the relay-board bridge, arranged by what the caller may conclude.

The gateway's lifecycle (DESIGN.md) hinges on one question after a release:
did the board act? The classes below answer it, so the executor has one branch
per class instead of inspecting messages::

    BoardError                      base of everything raised by firmware_bridge
    ├── ProtocolError (ValueError)  bytes or values that do not fit protocol v1
    │   ├── InvalidFrame            not a frame: bad SOF / VER / LEN / CRC
    │   └── IncompleteFrame         "need more bytes": a frame may still complete
    ├── BoardUnavailable            port not open / cannot open / gone BEFORE the
    │                               request was written: definitely NOT sent
    ├── BoardNoReply                written, but no valid reply after all
    │                               retransmissions: outcome UNKNOWN (ask QUERY)
    └── BoardNack                   the board refused (``.reason``): it did NOT act

``IncompleteFrame`` is a ``ProtocolError`` so that code catching the latter
never leaks it, but ``FrameDecoder`` uses it as the "wait for more bytes"
signal, distinct from garbage (``InvalidFrame``) - see docs/firmware-protocol.md
"Receiving".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # frames imports this module; avoid the cycle at runtime
    from firmware_bridge.frames import NackReason

__all__ = [
    "BoardError",
    "BoardNack",
    "BoardNoReply",
    "BoardUnavailable",
    "IncompleteFrame",
    "InvalidFrame",
    "ProtocolError",
]


class BoardError(Exception):
    """Base class of every error raised by firmware_bridge."""


class ProtocolError(BoardError, ValueError):
    """Bytes or field values that do not fit protocol v1."""


class InvalidFrame(ProtocolError):
    """The bytes at the start of the buffer are not a valid frame (garbage)."""


class IncompleteFrame(ProtocolError):
    """The bytes so far are a valid frame prefix; ``needed`` more may complete it."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need at least {needed} more byte(s)")
        self.needed = needed


class BoardUnavailable(BoardError):
    """The port is not open, could not be opened or vanished before the write.

    The request was definitely not sent, so the caller may mark it failed(safe).
    """


class BoardNoReply(BoardError):
    """The request was written but no valid reply came after all retries.

    The outcome is unknown: the board may have acted. Recover with QUERY on the
    same boot id, never by releasing again.
    """


class BoardNack(BoardError):
    """The board answered NACK: it refused the request and did not act."""

    def __init__(self, reason: NackReason, request_type: int, boot_id: int) -> None:
        super().__init__(f"board refused request 0x{request_type:02X}: {reason.name}")
        self.reason = reason
        self.request_type = request_type
        self.boot_id = boot_id
