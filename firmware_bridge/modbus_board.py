"""Modbus RTU relay boards over RS-485 (pymodbus), timed by the gateway.

Mapping: coil ``coil_offset + channel - 1`` is the relay of ``channel``; discrete input
``input_offset + n - 1`` is input line n (busy signals); optionally the discrete inputs
from ``relay_sense_offset`` carry the sensed relay contacts (1 = closed), which makes
stuck relays detectable. Pulses and holds are timed by ``HostTimedBoard``.

What a pymodbus outcome tells the gateway (exceptions.py: did the board act?):

- **Not connected / cannot open** (``ConnectionException``, ``connect()`` False): no
  byte left the host -> ``BoardUnavailable``. We check ``connected`` ourselves before
  every request because pymodbus would otherwise silently try to reconnect inside
  ``execute`` and, for serial, drop the frame with only a log line if that fails.
- **Timeout after the retries** (``ModbusIOException``): the request was written and
  the board may have executed it with only the response lost -> ``BoardNoReply``,
  never ``BoardUnavailable``. This holds for the *first* coil write as well: the
  relay may be closed. The command id stays recorded (``query`` answers executed),
  the coil is forced off best effort, and recovery treats it as "maybe released".
  The driver retransmits the identical request ``retries`` times itself (pymodbus
  runs with ``retries=0``, so the driver knows which attempt an answer belongs to);
  that is safe here only because a coil write sets an absolute level (writing ON
  twice is ON), never a toggle. A retransmission delays the edge by up to
  ``timeout_s``.
- **Exception response**: the device answered, so it parsed the request. Codes 01
  illegal function, 02 illegal address, 03 illegal value, 06 device busy and 0A
  gateway path unavailable are refusals before acting -> ``BoardNack``, but only
  when they answer the *first* transmission. After a timed-out attempt the board
  may already have executed that earlier copy (only its reply was lost), so a
  refusal of the retransmission says nothing about the coil -> ``BoardNoReply``.
  Code 04 (device failure) may come after a partial action, and 05/07/08/0B do not
  say whether anything happened -> ``BoardNoReply`` (unknown), the conservative side.
- A serial line lost mid-request is not reported by pymodbus (its serial transport
  does not fail the pending request): it surfaces as the timeout above.

One owner per bus: pymodbus opens the port with pyserial's ``exclusive=True``
(an ``flock`` on the device), so a second ``ModbusBoard`` on the same port gets
``BoardUnavailable`` on ``open``. Boards with several unit ids on one RS-485 line
would have to share one client; this driver owns the port for one unit id.
pymodbus' own reconnect loop is disabled (``reconnect_delay=0``): reconnection is the
supervisor's job, like aiomqtt's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from pymodbus import FramerType, ModbusException
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from firmware_bridge.exceptions import BoardNack, BoardNoReply, BoardUnavailable
from firmware_bridge.frames import FrameType, NackReason
from firmware_bridge.host_timed import HostTimedBoard, OutputFault
from firmware_bridge.modbus_limits import MAX_UNIT_ID, TIMEOUT_S

__all__ = ["MAX_UNIT_ID", "TIMEOUT_S", "ModbusBoard"]

LOGGER = logging.getLogger(__name__)

# Modbus exception codes that mean "refused before acting" (Modbus application
# protocol v1.1b3, section 7) and the NACK reason the gateway understands.
_REFUSALS: dict[int, NackReason] = {
    0x01: NackReason.UNKNOWN_TYPE,  # ILLEGAL FUNCTION
    0x02: NackReason.BAD_CHANNEL,  # ILLEGAL DATA ADDRESS
    0x03: NackReason.BAD_PARAMS,  # ILLEGAL DATA VALUE
    0x06: NackReason.CHANNEL_BUSY,  # SERVER DEVICE BUSY
    0x0A: NackReason.BAD_CHANNEL,  # GATEWAY PATH UNAVAILABLE: nothing was routed
}


class ModbusBoard(HostTimedBoard):
    """A Modbus RTU relay board. Satisfies ``driver.BoardDriver``."""

    def __init__(
        self,
        port: str,
        *,
        unit_id: int = 1,
        baudrate: int = 9600,
        channels: int = 8,
        inputs: int = 8,
        coil_offset: int = 0,
        input_offset: int = 0,
        relay_sense_offset: int | None = None,
        active_low: frozenset[int] = frozenset(),
        timeout_s: float = TIMEOUT_S,
        retries: int = 2,
        on_fault: Callable[[OutputFault], None] | None = None,
    ) -> None:
        super().__init__(channels=channels, active_low=active_low, on_fault=on_fault)
        if not 1 <= unit_id <= MAX_UNIT_ID:
            raise ValueError(f"unit_id {unit_id} not in 1..{MAX_UNIT_ID}")
        if inputs < 0:
            raise ValueError("inputs must be >= 0")
        self.port = port
        self.unit_id = unit_id
        self.inputs = inputs
        self._baudrate = baudrate
        self._coil_offset = coil_offset
        self._input_offset = input_offset
        self._relay_sense_offset = relay_sense_offset
        self._timeout_s = timeout_s
        self._retries = retries
        self._client: AsyncModbusSerialClient | None = None

    def __repr__(self) -> str:
        return f"ModbusBoard({self.port!r}, unit_id={self.unit_id})"

    async def _connect(self) -> None:
        client = AsyncModbusSerialClient(
            self.port,
            framer=FramerType.RTU,
            baudrate=self._baudrate,
            timeout=self._timeout_s,
            retries=0,  # retransmissions are ours: see _execute
            reconnect_delay=0,  # no background reconnects: the supervisor decides
            name=f"modbus:{self.port}",
        )
        try:
            connected = await client.connect()
        except (ModbusException, OSError) as exc:
            client.close()
            raise BoardUnavailable(f"cannot open {self.port}: {exc}") from exc
        if not connected:
            client.close()
            # pymodbus only logs why (missing port, or locked by another owner).
            raise BoardUnavailable(f"cannot open {self.port} (missing or owned by another)")
        self._client = client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _connected_client(self) -> AsyncModbusSerialClient:
        client = self._client
        if client is None or not client.connected:
            raise BoardUnavailable(f"{self.port} is not connected; request not sent")
        return client

    async def _execute(
        self, request: Callable[[], Awaitable[ModbusPDU]], what: str
    ) -> tuple[ModbusPDU, int]:
        """Send ``request`` up to ``1 + retries`` times until an answer comes.

        Returns the answer and the number of timed-out attempts before it (so
        ``_check`` knows whether an earlier copy may have acted unseen)."""
        attempt = 0
        while True:
            try:
                # Never let pymodbus reconnect behind our back (see module doc).
                self._connected_client()
                return await request(), attempt
            except (BoardUnavailable, ConnectionException) as exc:
                if attempt == 0:  # nothing was sent
                    if isinstance(exc, BoardUnavailable):
                        raise
                    raise BoardUnavailable(f"{self.port}: {exc}") from exc
                raise BoardNoReply(  # an earlier, unanswered copy may have acted
                    f"{self.port}: {what}: link lost after {attempt} unanswered attempt(s)"
                    " (may have acted)"
                ) from exc
            except ModbusIOException as exc:
                if attempt >= self._retries:
                    raise BoardNoReply(
                        f"{self.port}: no reply to {what} after {attempt + 1} attempt(s)"
                        " (may have acted)"
                    ) from exc
                attempt += 1
                LOGGER.info("%s: no reply to %s, retransmission %d", self.port, what, attempt)
            except ModbusException as exc:  # anything else after the write: unknown
                raise BoardNoReply(f"{self.port}: {what}: {exc}") from exc

    async def _set_output(self, channel: int, on: bool) -> None:
        client = self._connected_client()
        level = on != self._is_low_active(channel)
        address = self._coil_offset + channel - 1
        what = f"coil {address} := {level}"
        response, retried = await self._execute(
            lambda: client.write_coil(address, level, device_id=self.unit_id), what
        )
        self._check(response, FrameType.RELEASE, what, retried)

    async def _read_raw(self) -> tuple[int, int | None]:
        inputs = await self._read_bits(self._input_offset, self.inputs) if self.inputs else 0
        relays = None
        if self._relay_sense_offset is not None:
            relays = await self._read_bits(self._relay_sense_offset, self.channels)
        return inputs, relays

    async def _read_bits(self, address: int, count: int) -> int:
        client = self._connected_client()
        what = f"read inputs {address}+{count}"
        response, retried = await self._execute(
            lambda: client.read_discrete_inputs(address, count=count, device_id=self.unit_id),
            what,
        )
        self._check(response, FrameType.READ_INPUTS, what, retried)
        bits = response.bits[:count]
        if len(bits) < count:
            raise BoardNoReply(f"{self.port}: short reply reading inputs {address}+{count}")
        return sum(1 << n for n, bit in enumerate(bits) if bit)

    def _check(self, response: ModbusPDU, request_type: int, what: str, retried: int) -> None:
        if not response.isError():
            return
        code = response.exception_code if isinstance(response, ExceptionResponse) else -1
        reason = _REFUSALS.get(code)
        LOGGER.warning("%s: %s answered exception 0x%02X", self.port, what, code & 0xFF)
        if reason is None:
            raise BoardNoReply(
                f"{self.port}: {what}: exception 0x{code & 0xFF:02X}, outcome unknown"
            )
        if retried:
            # The refusal answers a retransmission; an earlier, unanswered copy may
            # have been executed (e.g. coil switched, then "busy" for the repeat).
            raise BoardNoReply(
                f"{self.port}: {what}: exception 0x{code & 0xFF:02X} after {retried}"
                " unanswered attempt(s), earlier attempt may have acted"
            )
        raise BoardNack(reason, request_type, self.boot_id)
