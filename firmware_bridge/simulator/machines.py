"""Simulated washers and dryers wired to the board: relay edges in, busy input level out.

Sans-I/O like the board: every method takes the time it happens at. A machine counts
the pulses of one train (its ``coins``) or the length of an enable (``level``), starts
after ``start_ms`` (or ``late_ms``, or never), runs ``run_ms`` and raises its busy
input meanwhile (inverted for an ``active_low`` machine); a dryer with
``minutes_per_pulse`` is topped up by further pulses while it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from firmware_bridge.driver import MAX_INPUTS, MIN_EDGE_MS
from firmware_bridge.simulator.records import Edge

__all__ = ["LEVEL_START_MS", "MachineSpec", "SimulatedMachine"]

# A "level" machine starts on an enable held at least this long.
LEVEL_START_MS = 100


@dataclass(frozen=True)
class MachineSpec:
    """A washer or dryer wired to relay ``channel``, busy on input ``input``.

    Timings are machine milliseconds, divided by the machine time scale.
    """

    channel: int
    input: int
    start_ms: int = 300  # from start condition to busy
    run_ms: int = 2000  # busy duration
    never_starts: bool = False
    late_ms: int | None = None  # start this long after the condition instead
    coins: int = 1  # pulses in one train needed to start
    level: bool = False  # starts on an enable held >= LEVEL_START_MS
    minutes_per_pulse: float = 0.0  # dryer top-up: run extended per pulse while busy
    active_low: bool = False  # busy input raw level 1 when idle, 0 while running

    @classmethod
    def parse(cls, spec: str) -> MachineSpec:
        """``channel=1,input=1,start_ms=300,run_ms=2000,never_starts,coins=2,active_low,...``"""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            values[key.strip()] = value.strip() if sep else True
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MachineSpec:
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown machine option {key!r}")
            if key in ("never_starts", "level", "active_low"):
                kwargs[key] = value if isinstance(value, bool) else str(value).lower() in (
                    "1", "true", "yes"
                )
            elif key == "minutes_per_pulse":
                kwargs[key] = float(value)
            else:
                kwargs[key] = int(value)
        if "channel" not in kwargs or "input" not in kwargs:
            raise ValueError("a machine needs channel= and input=")
        spec = cls(**kwargs)
        if not (1 <= spec.channel <= 255 and 1 <= spec.input <= MAX_INPUTS):
            raise ValueError("machine channel must be 1..255 and input 1..64")
        if spec.coins < 1 or min(spec.start_ms, spec.run_ms, spec.late_ms or 0) < 0:
            raise ValueError("machine coins must be >= 1 and timings >= 0")
        return spec



class SimulatedMachine:
    """Sans-I/O washer/dryer: relay edges in, busy level out."""

    def __init__(self, spec: MachineSpec, machine_time_scale: float) -> None:
        self.spec = spec
        self._scale = machine_time_scale
        self.state = "idle"  # idle | starting | running
        self._train: int | None = None  # command id of the train being counted
        self._pulses = 0
        self._on_since: float | None = None
        self._start_at = 0.0
        self._run_until = 0.0
        self._extra_s = 0.0  # top-up received while starting

    def _seconds(self, machine_ms: float) -> float:
        return machine_ms / 1000 / self._scale

    @property
    def busy(self) -> bool:
        return self.state == "running"

    @property
    def raw_level(self) -> bool:
        """The busy input's electrical level (1 = high)."""
        return self.busy != self.spec.active_low

    def next_deadline(self) -> float | None:
        if self.state == "starting":
            return self._start_at
        if self.state == "running":
            return self._run_until
        return None

    def advance(self, now: float) -> None:
        if self.state == "starting" and now >= self._start_at:
            self.state = "running"
            self._run_until = self._start_at + self._seconds(self.spec.run_ms) + self._extra_s
            self._extra_s = 0.0
        if self.state == "running" and now >= self._run_until:
            self.state = "idle"

    def edge(self, edge: Edge, held_ms: float) -> None:
        """``held_ms``: for an off edge, how long the contact was closed, in the
        program's own milliseconds (independent of the relay time scale)."""
        self.advance(edge.monotonic)
        if edge.on:
            return
        spec = self.spec
        if self.state != "idle":
            if spec.minutes_per_pulse > 0 and held_ms >= MIN_EDGE_MS:
                extra = self._seconds(spec.minutes_per_pulse * 60_000)
                if self.state == "running":
                    self._run_until += extra
                else:
                    self._extra_s += extra
            return
        if spec.level:
            met = held_ms >= LEVEL_START_MS
        else:
            if edge.command_id != self._train:
                self._train, self._pulses = edge.command_id, 0
            self._pulses += 1
            met = self._pulses >= spec.coins
        if not met or spec.never_starts:
            return
        self._train, self._pulses = None, 0
        delay_ms = spec.late_ms if spec.late_ms is not None else spec.start_ms
        self.state = "starting"
        self._start_at = edge.monotonic + self._seconds(delay_ms)

