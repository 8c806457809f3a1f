"""Scenario files of the simulator program: its command-line options as one JSON object."""

from __future__ import annotations

import json
from typing import Any

from firmware_bridge.simulator.machines import MachineSpec

__all__ = ["load_scenario", "machine_spec"]

_SCENARIO_KEYS = {
    "channels", "boot_id", "time_scale", "edges", "machine", "machines",
    "machine_time_scale", "stuck_relay", "no_relay_sense", "drop_rate", "corrupt_rate",
    "delay_ms", "seed", "reboot_mid_train", "drop_release_acks", "ring_size", "firmware",
}


def load_scenario(path: str) -> dict[str, Any]:
    """A scenario JSON object: the command-line options, dashes as underscores
    (``"machine"`` or ``"machines"``: a list of SPEC strings or objects;
    ``"stuck_relay"``: a channel or a list; ``"boot_id"``: hex string)."""
    with open(path, encoding="utf-8") as file:
        scenario = json.load(file)
    if not isinstance(scenario, dict):
        raise ValueError("a scenario is a JSON object")
    unknown = set(scenario) - _SCENARIO_KEYS
    if unknown:
        raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
    return scenario


def machine_spec(item: object) -> MachineSpec:
    if isinstance(item, str):
        return MachineSpec.parse(item)
    if isinstance(item, dict):
        return MachineSpec.from_dict(item)
    raise ValueError(f"a machine is a SPEC string or an object, not {item!r}")

