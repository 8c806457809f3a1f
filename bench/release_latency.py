"""Benchmark: cloud MQTT publish -> first byte of the release frame at the simulated board.

Real processes as in a store: broker (mosquitto where installed), the simulated board on
a pty, the daemon with its journal flushed as synchronous=FULL would. The board stamps
the first byte of every RELEASE frame with time.monotonic() (system-wide on Linux), so
the latency is measured across processes without timing any test.

    python bench/release_latency.py [--n 500] [--out FILE]

Prints one JSON document: closed loop (publish, wait for the result, next) p50/p90/p99,
and an open-loop burst (all commands published back to back) in commands per second.

Not what a store sees: the closed loop waits for each result and the daemon logs only
warnings here. bench/store_view.py measures the daemon as shipped, back to back and in
bursts, beside a minimal durable gateway (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# devtools/ (the harness) is not installed with the package: take it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools.broker import LocalBroker  # noqa: E402
from devtools.stack import CloudStandIn, DaemonProcess, SimulatorProcess, demo_config  # noqa: E402
from gateway.dispatch import command_id_for  # noqa: E402

MACHINES = 64  # the burst spreads over many machines so none is refused as busy


def _machines() -> list[dict[str, object]]:
    return [
        {"id": f"M{i}", "kind": "washer", "channel": i, "cycles": {"normal": {"pulses": 1}}}
        for i in range(1, MACHINES + 1)
    ]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _wait_records(sim: SimulatorProcess, count: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = sim.actuation_records()
        if len(records) >= count:
            return {r["command_id"]: r["rx_monotonic"] for r in records}
        time.sleep(0.05)
    raise TimeoutError(f"only {len(sim.actuation_records())} of {count} releases")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="metalav-bench-") as tmp, LocalBroker() as broker:
        work = Path(tmp)
        gateway_id = "bench-gw"
        cloud = CloudStandIn(broker.host, broker.port, gateway_id)
        sim = SimulatorProcess(work, "--channels", str(MACHINES))
        sim.start()
        config = work / "gateway.toml"
        config.write_text(
            demo_config(
                work,
                gateway_id=gateway_id,
                mqtt_port=broker.port,
                public_key_pem=cloud.public_key_pem,
                board_port=sim.link,
                machines=_machines(),
            )
        )
        daemon = DaemonProcess(work, config, env={"METALAV_LOG_LEVEL": "WARNING"})
        daemon.start()
        try:
            daemon.wait_ready()
            # Signing is the cloud's cost, not the gateway's: done before the clock runs.
            closed = [
                (f"closed-{i}", cloud.sign(f"closed-{i}", machine_id=f"M{i % MACHINES + 1}"))
                for i in range(args.n)
            ]
            burst = [
                (f"burst-{i}", cloud.sign(f"burst-{i}", machine_id=f"M{i % MACHINES + 1}"))
                for i in range(args.n)
            ]

            sent_at: dict[str, float] = {}
            for key, token in closed:
                sent_at[key] = time.monotonic()
                cloud.publish(token)
                cloud.wait_for(key, state="released", timeout=10)
            rx = _wait_records(sim, args.n, timeout=30)
            latencies = [
                (rx[f"{command_id_for(key):016x}"] - sent_at[key]) * 1000 for key, _ in closed
            ]

            t0 = time.monotonic()
            for _key, token in burst:
                cloud._client.publish(cloud.command_topic, token, qos=1)  # noqa: SLF001 - no wait
            for key, _ in burst:  # every command reaches a final state
                cloud.wait_for(key, timeout=60)
            rx = {r["command_id"]: r["rx_monotonic"] for r in sim.actuation_records()}
            burst_rx = [
                rx[f"{command_id_for(k):016x}"]
                for k, _ in burst
                if f"{command_id_for(k):016x}" in rx
            ]
            elapsed = max(burst_rx) - t0
            outcomes: dict[str, int] = {}
            for k, _ in burst:
                final = [r for r in cloud.results_for(k) if r["final"]][-1]
                label = final["state"] + (f":{final['reason']}" if final["reason"] else "")
                outcomes[label] = outcomes.get(label, 0) + 1
        finally:
            daemon.stop()
            sim.stop()
            cloud.close()

    report = {
        "benchmark": "release_latency",
        "what": "cloud MQTT publish -> first byte of RELEASE at the simulated board",
        "journal": "sqlite WAL, flushed (fdatasync) before anything depends on a write",
        "broker": broker.kind,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "closed_loop": {
            "n": len(latencies),
            "p50_ms": round(statistics.median(latencies), 3),
            "p90_ms": round(_percentile(latencies, 90), 3),
            "p99_ms": round(_percentile(latencies, 99), 3),
            "max_ms": round(max(latencies), 3),
        },
        "open_loop_burst": {
            "n": args.n,
            "outcomes": outcomes,
            "seconds": round(elapsed, 3),
            "cmd_per_s": round(args.n / elapsed, 1),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
