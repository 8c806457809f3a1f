"""Modbus RTU settings the config validates, without loading pymodbus (which only a
store with a Modbus relay board needs: firmware_bridge/modbus_board.py)."""

from __future__ import annotations

__all__ = ["MAX_UNIT_ID", "TIMEOUT_S"]

#: Seconds to wait for a board's answer to one request, before retransmitting it.
TIMEOUT_S = 0.3
#: Unit ids 1..247 address one device (Modbus over serial line v1.02, section 2.2).
MAX_UNIT_ID = 247
