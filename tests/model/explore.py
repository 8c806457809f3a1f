"""The long profile of the release-protocol model: explore, then print what was explored.

    python -m tests.model.explore [--examples 2000] [--steps 60]

Runs the same state machine as the suite (tests/model/release_model.py) with many
more examples and steps, and prints one JSON object: the runs and steps explored,
how often each kind of event happened, the final states reached, and the seconds it
took. Exit status 1, with hypothesis's shrunk counterexample, when a promise broke.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from .release_model import STATS, ReleaseModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="runs of the machine")
    parser.add_argument("--steps", type=int, default=60, help="at most this many steps a run")
    parser.add_argument(
        "--no-shrink", action="store_true", help="report the first failure as found, unshrunk"
    )
    args = parser.parse_args(argv)
    # The core logs every lost frame and failed commit it survives: thousands of lines.
    logging.disable(logging.CRITICAL)

    runs = 0
    original_init = ReleaseModel.__init__

    def counting_init(self: ReleaseModel) -> None:
        nonlocal runs
        runs += 1
        original_init(self)

    ReleaseModel.__init__ = counting_init  # type: ignore[method-assign]
    config = settings(
        max_examples=args.examples,
        stateful_step_count=args.steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.generate] if args.no_shrink else list(Phase),
    )
    started = time.monotonic()
    failed = None
    try:
        run_state_machine_as_test(ReleaseModel, settings=config)
    except Exception as exc:  # the counterexample is printed by hypothesis above
        failed = f"{type(exc).__name__}: {exc}"
    report = {
        "runs": runs,
        "max_steps_per_run": args.steps,
        "steps": STATS["step"],
        "seconds": round(time.monotonic() - started, 1),
        "events": {k: v for k, v in sorted(STATS.items()) if k != "step" and v},
        "promise_broken": failed,
    }
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
