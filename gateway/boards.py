"""Builds the relay-board driver the config names. One driver, one owner of the bus."""

from __future__ import annotations

from collections.abc import Callable

from firmware_bridge.driver import BoardDriver
from firmware_bridge.host_timed import OutputFault
from firmware_bridge.serial_board import SerialBoard

from .config import GatewayConfig

__all__ = ["build_driver"]


def build_driver(config: GatewayConfig, on_fault: Callable[[OutputFault], None]) -> BoardDriver:
    """``on_fault``: a write that failed after the release was acknowledged (host-timed
    drivers only; the MCU board times its own pulses)."""
    board = config.board
    active_low = config.active_low_channels
    if board.driver == "serial":
        return SerialBoard(
            board.port,
            baudrate=board.baudrate,
            ack_timeout=board.ack_timeout_s,
            max_retries=board.max_retries,
        )
    if board.driver == "modbus":
        # Loaded only where configured: pymodbus costs a serial-board store ~5 MB.
        from firmware_bridge.modbus_board import ModbusBoard

        mb = board.modbus
        return ModbusBoard(
            board.port,
            unit_id=mb.unit_id,
            baudrate=board.baudrate,
            channels=mb.channels,
            inputs=mb.inputs,
            coil_offset=mb.coil_offset,
            input_offset=mb.input_offset,
            relay_sense_offset=mb.relay_sense_offset,
            active_low=active_low,
            timeout_s=mb.timeout_s,
            retries=board.max_retries,
            on_fault=on_fault,
        )
    from firmware_bridge.gpio_board import GpioBoard

    return GpioBoard(
        board.gpio.chip,
        outputs=dict(board.gpio.outputs),
        inputs=dict(board.gpio.inputs),
        active_low=active_low,
        on_fault=on_fault,
    )
