"""Federated offsite-tuning on Flower: many data owners fine-tune one adapter on the shared emulator.

* :mod:`.core`: what crosses the wire (adapter updates in a fixed layout), the checks both sides
  apply to every message.
* :mod:`.robust`: what bounds one client: the example-count cap, update-norm clipping, the
  aggregation rules (Flower's FedAvg, FedMedian, FedTrimmedAvg, Krum), the aggregate's bound.
* :mod:`.apps`: the model owner's ``ServerApp`` and the data owners' ``ClientApp`` (optionally
  with Flower's SecAgg+), and the module-level ``server_app`` / ``client_app`` that ``flwr run``
  and ``flower-supernode`` load.
* :mod:`.runtime`: an in-process runtime (N virtual SuperNodes, no Ray) for simulation and tests.
* :mod:`.partition`: one training set split over simulated clients, IID or label-skewed.

Flower (``flwr``) is imported only when this package is.
"""

import os

# Flower sends usage telemetry (flwr.supercore.telemetry) unless FLWR_TELEMETRY_ENABLED=0, and reads
# the variable once, when flwr is first imported: a privacy tool sends nothing anywhere unless the
# user asks, so gradot turns it off before any flwr import (a user who sets the variable keeps it).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
