"""The model owner's settings of a federated run, which are also the run config of ``flwr run``, and the
node config keys a data owner's SuperNode reads."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields



from ..artifacts import DEFAULT_MAX_CHANGE
from ..finetune import default_learning_rate
from .robust import (
    AGGREGATES,
)

log = logging.getLogger("gradot.federated.apps")  # one logger for the federation's records


RECORD_FILE = "federation.json"


@dataclass
class FederationSettings:
    """The model owner's settings of a federated run (also the run config of ``flwr run``)."""

    rounds: int = 3
    local_steps: int = 10      # optimizer steps per client per round; 0: local_epochs decide
    local_epochs: float = 1.0
    lr: float = default_learning_rate(None)  # gradot finetune's rate for a data owner's adapter
    batch_size: int = 8
    max_length: int = 256
    mu: float = 0.0            # FedProx proximal weight; 0: FedAvg
    min_clients: int = 2       # quorum: fewer accepted updates and the round keeps the old adapter
    min_available: int = 2     # clients that must be connected before a round starts
    round_timeout: float = 600.0  # seconds the server waits for a round's replies (docs/federated.md: sizing)
    secagg: bool = False
    secagg_clip: float = 1.0   # SecAgg+ clipping range of each (example-weighted) update value
    secagg_max_weight: float = 10000.0  # SecAgg+'s bound on one client's example count
    seed: int = 0
    # > 0: leave out an update (drop an aggregate) moving a tensor more than this x its norm; plug_in's default bound
    max_change: float = DEFAULT_MAX_CHANGE
    max_examples: int = 0      # > 0: refuse a client claiming more examples (under SecAgg+ also secagg_max_weight)
    max_examples_ratio: float = 4.0  # > 0: refuse a count above this x the round's (low) median count
    clip: float = 0.02         # > 0: clip each update's L2 norm to this x the global adapter's (0: no clipping)
    aggregate: str = "fedavg"  # fedavg | median | trimmed-mean | krum (Flower's; SecAgg+: fedavg only)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if self.rounds < 1:
            bad("rounds", "must be >= 1")
        if self.local_steps < 0:
            bad("local_steps", "must be >= 0")
        if self.local_steps == 0 and not self.local_epochs > 0:
            bad("local_epochs", "must be > 0 when local_steps is 0")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.mu < 0:
            bad("mu", "must be >= 0")
        if self.min_clients < 1:
            bad("min_clients", "must be >= 1")
        if self.secagg and self.min_clients < 2:
            bad("min_clients", "SecAgg+ needs at least 2 clients per round")
        if not self.round_timeout > 0:
            bad("round_timeout", "must be > 0")
        if self.max_change < 0:
            bad("max_change", "must be >= 0")
        if self.max_examples < 0:
            bad("max_examples", "must be >= 0 (0: no fixed cap)")
        if self.max_examples_ratio and self.max_examples_ratio < 1:
            bad("max_examples_ratio", "must be 0 (off) or >= 1")
        if self.clip < 0:
            bad("clip", "must be >= 0 (0: no clipping)")
        if self.aggregate not in AGGREGATES:
            bad("aggregate", f"must be one of {', '.join(AGGREGATES)}")
        if self.secagg and self.aggregate != "fedavg":
            bad("aggregate", "SecAgg+ hides the individual updates that a robust rule needs: fedavg only")
        if self.secagg and self.secagg_max_weight <= 0:
            bad("secagg_max_weight", "must be > 0")

    @classmethod
    def from_run_config(cls, config: dict) -> FederationSettings:
        """From a Flower run config (keys with dashes: ``num-rounds``, ``local-steps``, ...)."""
        names = {f.name for f in fields(cls)}
        values = {}
        for key, value in config.items():
            name = RUN_CONFIG.get(key, key.replace("-", "_"))
            if name in names:
                values[name] = value
        return cls(**values)


#: Run-config keys (``flwr run --run-config``) and the settings they set; also: ``emulator`` (the
#: model owner's emulator folder), ``out`` (where the aggregate adapter and record go),
#: ``plug-model`` (a model to plug the aggregate into, written to ``out/plugged``).
RUN_CONFIG = {"num-rounds": "rounds", "local-steps": "local_steps", "local-epochs": "local_epochs",
              "lr": "lr", "batch-size": "batch_size", "max-length": "max_length", "mu": "mu",
              "min-clients": "min_clients", "min-available": "min_available", "round-timeout": "round_timeout",
              "secagg": "secagg", "secagg-clip": "secagg_clip", "secagg-max-weight": "secagg_max_weight",
              "seed": "seed", "max-change": "max_change", "max-examples": "max_examples",
              "max-examples-ratio": "max_examples_ratio", "clip": "clip", "aggregate": "aggregate"}
#: Node-config keys of a data owner's SuperNode (``flower-supernode --node-config``).
NODE_CONFIG = ("emulator", "task", "data", "data-dir", "train-limit", "partition-id", "num-partitions",
               "partition", "alpha")
