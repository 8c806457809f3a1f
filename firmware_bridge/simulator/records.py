"""What the simulated board did: the releases it executed and the relay edges it switched."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Actuation", "Edge"]


@dataclass(frozen=True, slots=True)
class Actuation:
    """One physical release, as the board's relay would perform it."""

    rx_monotonic: float  # time.monotonic() of the read holding the frame's first byte
    boot_id: int
    command_id: int
    channel: int
    pulse_count: int  # 0 for a level hold
    on_ms: int
    off_ms: int
    kind: str = "pulses"  # "pulses" | "level"
    hold_ms: int = 0


@dataclass(frozen=True, slots=True)
class Edge:
    """A relay contact changing state, at the time the board switched it."""

    monotonic: float
    channel: int
    on: bool
    command_id: int | None  # None when no program drives it

