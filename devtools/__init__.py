"""Development harness: the demo, a throwaway local broker, a whole store from real processes.

Not shipped to stores: the wheel holds only ``gateway``, ``firmware_bridge`` and
``cloud_sync`` (pyproject.toml), so nothing here can run on a store box by accident.
It is imported from a source checkout: pytest puts the checkout on ``sys.path``
(``pythonpath`` in pyproject.toml), the benchmarks add it themselves, and
``metalav-gateway demo`` looks for it next to the ``gateway`` package it runs from.

- ``stack``: the simulated board, the daemon and a cloud stand-in as real processes;
- ``broker``: mosquitto (or the amqtt fallback) on a free loopback port;
- ``demo``: ``metalav-gateway demo``, one paid cycle end to end.
"""
