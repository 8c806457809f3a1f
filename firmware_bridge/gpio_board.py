"""Raspberry Pi GPIO: relays and busy inputs on lines of a GPIO chip (libgpiod v2).

Edges are timed by ``HostTimedBoard``. The chip is reached through ``GpioChip``, a
small interface shaped like libgpiod v2's ``request_lines`` / ``LineRequest``:
``GpiodChip`` implements it with the ``gpiod`` bindings (imported lazily, so this
package imports on machines without them), and the tests implement it with a fake
chip, because no GPIO chip exists where they run (DESIGN.md "Tests use real parts").

Levels: every line is requested *without* libgpiod's active-low flag, so a value is
the electrical level (True = high). Relay polarity is applied here from
``active_low``; inputs are reported raw, the gateway applies each machine's active
level. Requesting the lines drives the outputs, so ``open`` requests them at their
*inactive* level (contacts open), never at "on".

One owner per line: the kernel refuses a second request of a requested line (EBUSY);
that, or a missing chip, is ``BoardUnavailable`` on ``open``. A set/get is a single
ioctl that either applied or failed, so a failure is ``BoardUnavailable`` (not done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from firmware_bridge.exceptions import BoardUnavailable
from firmware_bridge.host_timed import HostTimedBoard, OutputFault

__all__ = ["CONSUMER", "GpioBoard", "GpioChip", "GpioLines", "GpiodChip", "check_lines"]

LOGGER = logging.getLogger(__name__)

CONSUMER = "metalav"  # shown by `gpioinfo` as the owner of our lines


class GpioLines(Protocol):
    """Requested lines (libgpiod v2 ``LineRequest``). Values are electrical levels."""

    def set_value(self, offset: int, high: bool) -> None: ...

    def get_values(self, offsets: Sequence[int]) -> list[bool]: ...

    def release(self) -> None: ...


class GpioChip(Protocol):
    def request_lines(
        self, *, consumer: str, outputs: Mapping[int, bool], inputs: Collection[int]
    ) -> GpioLines:
        """Request ``outputs`` (offset -> initial level) as outputs and ``inputs`` as
        inputs, all or nothing. ``OSError`` if the chip is missing or a line is
        already requested (EBUSY)."""
        ...


class GpiodChip:
    """``GpioChip`` on a real chip through the libgpiod v2 Python bindings."""

    def __init__(self, path: str = "/dev/gpiochip0") -> None:
        self.path = path

    def request_lines(
        self, *, consumer: str, outputs: Mapping[int, bool], inputs: Collection[int]
    ) -> GpioLines:
        import gpiod  # lazy: the package must import without libgpiod
        from gpiod.line import Direction, Value

        config: dict[int, gpiod.LineSettings | None] = {}
        for offset, high in outputs.items():
            config[offset] = gpiod.LineSettings(
                direction=Direction.OUTPUT,
                output_value=Value.ACTIVE if high else Value.INACTIVE,
            )
        for offset in inputs:
            config[offset] = gpiod.LineSettings(direction=Direction.INPUT)
        request = gpiod.request_lines(
            self.path,
            config=dict(config.items()),
            consumer=consumer,
        )
        return _GpiodLines(request)


class _GpiodLines:
    def __init__(self, request: object) -> None:
        import gpiod

        assert isinstance(request, gpiod.LineRequest)
        self._request = request

    def set_value(self, offset: int, high: bool) -> None:
        from gpiod.line import Value

        self._request.set_value(offset, Value.ACTIVE if high else Value.INACTIVE)

    def get_values(self, offsets: Sequence[int]) -> list[bool]:
        from gpiod.line import Value

        return [v == Value.ACTIVE for v in self._request.get_values(list(offsets))]

    def release(self) -> None:
        self._request.release()


def check_lines(outputs: Mapping[int, int], inputs: Mapping[int, int]) -> None:
    """Raise ``ValueError`` unless ``outputs`` maps channels 1..N and ``inputs`` numbers
    from 1, each to its own line. (The gateway's config asks too, so that a config check
    refuses what this would.)"""
    if not outputs:
        raise ValueError("at least one output channel is needed")
    if sorted(outputs) != list(range(1, len(outputs) + 1)):
        raise ValueError(f"output channels must be 1..{len(outputs)}, got {sorted(outputs)}")
    if any(n < 1 for n in inputs):
        raise ValueError("input numbers start at 1")
    offsets = list(outputs.values()) + list(inputs.values())
    if len(set(offsets)) != len(offsets):
        raise ValueError("a line offset is used twice")


class GpioBoard(HostTimedBoard):
    """Relays and inputs on GPIO lines. Satisfies ``driver.BoardDriver``.

    ``outputs`` maps channel (1..N, contiguous) to line offset, ``inputs`` maps input
    number (1..) to line offset.
    """

    def __init__(
        self,
        chip_path: str = "/dev/gpiochip0",
        *,
        outputs: dict[int, int],
        inputs: dict[int, int],
        active_low: frozenset[int] = frozenset(),
        chip: GpioChip | None = None,
        on_fault: Callable[[OutputFault], None] | None = None,
    ) -> None:
        check_lines(outputs, inputs)
        super().__init__(channels=len(outputs), active_low=active_low, on_fault=on_fault)
        self.chip_path = chip_path
        self._outputs = dict(outputs)
        self._inputs = dict(inputs)
        self._chip: GpioChip = chip if chip is not None else GpiodChip(chip_path)
        self._lines: GpioLines | None = None

    def __repr__(self) -> str:
        return f"GpioBoard({self.chip_path!r})"

    async def _connect(self) -> None:
        # Contacts open from the very first moment the lines are ours.
        initial = {
            offset: self._is_low_active(channel) for channel, offset in self._outputs.items()
        }
        try:
            self._lines = self._chip.request_lines(
                consumer=CONSUMER, outputs=initial, inputs=list(self._inputs.values())
            )
        except (OSError, ValueError) as exc:
            raise BoardUnavailable(f"cannot request lines on {self.chip_path}: {exc}") from exc

    async def _disconnect(self) -> None:
        lines, self._lines = self._lines, None
        if lines is not None:
            try:
                lines.release()
            except OSError as exc:
                LOGGER.error("releasing lines of %s failed: %s", self.chip_path, exc)

    def _requested(self) -> GpioLines:
        if self._lines is None:
            raise BoardUnavailable(f"{self.chip_path}: lines not requested")
        return self._lines

    async def _set_output(self, channel: int, on: bool) -> None:
        lines = self._requested()
        try:
            lines.set_value(self._outputs[channel], on != self._is_low_active(channel))
        except OSError as exc:
            raise BoardUnavailable(f"{self.chip_path}: set channel {channel}: {exc}") from exc

    async def _read_raw(self) -> tuple[int, int | None]:
        lines = self._requested()
        if not self._inputs:
            return 0, None
        numbers = sorted(self._inputs)
        try:
            values = lines.get_values([self._inputs[n] for n in numbers])
        except OSError as exc:
            raise BoardUnavailable(f"{self.chip_path}: read inputs: {exc}") from exc
        return sum(1 << (n - 1) for n, high in zip(numbers, values, strict=True) if high), None
