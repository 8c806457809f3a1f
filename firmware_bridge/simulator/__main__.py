"""``python -m firmware_bridge.simulator``: serve a simulated board on a pty (see ``program``)."""

import sys

from firmware_bridge.simulator.program import main

sys.exit(main())
