"""Flower apps: the model owner's ``ServerApp`` and the data owners' ``ClientApp``.

Server (model owner): holds the emulator's adapter (the global adapter, initially the original
model's adapter layers), runs R rounds of FedAvg weighted by example counts (FedProx when
``mu > 0``: the server side is FedAvg, the proximal term is in the clients' gradients; or another
rule of :mod:`.robust`), checks every reply (:func:`gradot.federated.core.check_update`, then the
example-count cap) and leaves out, with a logged reason, any client that fails, clips every
update's norm, and applies an aggregate only once it passes its own checks; a round with fewer
accepted clients than the quorum keeps the previous adapter. At the end it writes the aggregate as an ordinary gradot adapter folder (``plug_in``
checks it like any other) and a ``federation.json`` record of every round.

Client (data owner): receives the global adapter, checks it against its own emulator (the
fingerprint and layout the server claims, shapes, dtypes, finite values; a failing message is
refused with an error reply), fine-tunes it with the ``gradot finetune`` path (transformers'
Trainer, loss on answer tokens) on its own data for S steps or E epochs, and replies with
``local - global`` for the adapter tensors only.

With ``secagg`` the fit round is Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the clients): the server then sees only the weighted sum of the updates,
so its checks can look at each client's claimed fingerprint, layout and count, and at the sum's
values, but never at one client's values (a round whose sum fails is dropped, not repaired).

Both apps are built by functions so that tests and ``gradot federate simulate`` can hand them
in-memory emulators and records; ``server_app`` and ``client_app`` at the bottom are the
module-level apps that ``flwr run`` / ``flower-supernode`` load, configured from the run config
and node config (keys in :data:`RUN_CONFIG` and :data:`NODE_CONFIG`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.serverapp import Grid, ServerApp

from ..artifacts import DEFAULT_MAX_CHANGE
from ..emulator import Emulator
from ..finetune import default_learning_rate
from .core import (
    AdapterSpec,
    UpdateRejected,
    adapter_parameters_by_name,
    apply_update,
    check_arrays,
    check_update,
    largest_change,
    load_arrays,
    to_arrays,
)
from .robust import (
    AGGREGATES,
    aggregate_bound,
    aggregate_updates,
    check_secure_mean,
    clip_update,
    count_cap,
    norm,
)

log = logging.getLogger(__name__)

__all__ = [
    "AdapterClient",
    "AdapterStrategy",
    "FederationSettings",
    "client_app",
    "make_client_app",
    "make_server_app",
    "server_app",
]

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


# ---------------------------------------------------------------------------------------------
# Server


def _fit_config(spec: AdapterSpec, s: FederationSettings, server_round: int, clip_norm: float) -> dict[str, Any]:
    return {"round": server_round, "fingerprint": spec.fingerprint, "spec": spec.digest,
            "local-steps": s.local_steps, "local-epochs": float(s.local_epochs), "lr": float(s.lr),
            "batch-size": s.batch_size, "max-length": s.max_length, "mu": float(s.mu), "seed": s.seed,
            "secagg-clip": float(s.secagg_clip), "clip-norm": float(clip_norm)}


class AdapterStrategy(FedAvg):
    """gradot's checks, then the count cap and clipping, then the aggregation rule, then the
    aggregate's own checks; keeps a record of every round."""

    def __init__(self, spec: AdapterSpec, initial: list[np.ndarray], settings: FederationSettings):
        s = settings
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=s.min_clients,
                         min_evaluate_clients=0, min_available_clients=max(s.min_available, s.min_clients),
                         accept_failures=True, initial_parameters=ndarrays_to_parameters(initial),
                         on_fit_config_fn=lambda rnd: _fit_config(spec, s, rnd, self.clip_norm))
        self.spec, self.settings = spec, s
        self.global_arrays = [a.copy() for a in initial]
        self.rounds: list[dict[str, Any]] = []
        self._started = time.perf_counter()

    @property
    def clip_norm(self) -> float:
        """This round's bound on one update's L2 norm: ``clip × ‖global adapter‖`` (0: none)."""
        return self.settings.clip * norm(self.global_arrays)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        self.global_arrays = parameters_to_ndarrays(parameters)
        self._started = time.perf_counter()
        if server_round > 1:
            # min_available is what round 1 waits for; after it, a node that failed or went away must
            # not hold later rounds (Flower would wait up to a day for it): the quorum is enough.
            self.min_available_clients = self.min_fit_clients
        return super().configure_fit(server_round, parameters, client_manager)

    def _leave_out(self, server_round, node, exc, excluded) -> None:
        log.warning("round %s: client %s left out: %s", server_round, node, exc)
        excluded.append({"node": str(node), "reason": str(exc)})

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures):
        s, secagg = self.settings, self.settings.secagg
        bound = self.clip_norm
        global_norm = norm(self.global_arrays)
        excluded: list[dict] = []
        checked = []
        for proxy, res in results:
            arrays = parameters_to_ndarrays(res.parameters)
            try:
                check_update(arrays, res.num_examples, dict(res.metrics), self.spec, check_values=not secagg)
            except UpdateRejected as exc:
                self._leave_out(server_round, proxy.node_id, exc, excluded)
                continue
            checked.append((proxy, res, arrays))
        # The model owner bounds each client's weight: FedAvg weights by the claimed count.
        cap = count_cap([r.num_examples for _, r, _ in checked], s.max_examples, s.max_examples_ratio)
        if secagg:
            cap = min(cap, s.secagg_max_weight)  # SecAgg+ itself assumes no count above it
        accepted = []
        for proxy, res, arrays in checked:
            try:
                if res.num_examples > cap:
                    raise UpdateRejected(f"claims {res.num_examples} examples, above this round's cap of {cap:g} "
                                         f"(--max-examples, --max-examples-ratio x the median count"
                                         + (", --secagg-max-weight" if secagg else "") + ")")
                entry = {"node": str(proxy.node_id), "examples": res.num_examples,
                         "train_loss": res.metrics.get("train_loss"), "seconds": res.metrics.get("seconds")}
                if not secagg:
                    self._check_change(server_round, proxy.node_id, arrays)
                    arrays, before = clip_update(arrays, bound)
                    entry["change"] = before / max(global_norm, 1e-12)
                    entry["clipped"] = bool(bound and before > bound)
                    if entry["clipped"]:
                        log.warning("round %s: client %s's update (norm %.4g) clipped to %.4g", server_round,
                                    proxy.node_id, before, bound)
            except UpdateRejected as exc:
                self._leave_out(server_round, proxy.node_id, exc, excluded)
                continue
            accepted.append((entry, res.num_examples, arrays))
        record = {
            "round": server_round,
            "accepted": [e for e, _, _ in accepted],
            "excluded": excluded,
            "failures": [_failure_text(f) for f in failures],
            "clip_norm": bound,
            "applied": False,
        }
        for f in record["failures"]:
            log.warning("round %s: a client failed: %s", server_round, f)
        new = None
        if len(accepted) < s.min_clients:
            record["note"] = f"{len(accepted)} accepted update(s), quorum {s.min_clients}: adapter kept"
        elif secagg and excluded:
            # The masked sum includes every client that took part; one cannot be taken back out.
            record["note"] = "a client failed the checks inside SecAgg+; its update is in the sum: round dropped"
        else:
            try:
                if secagg:
                    # SecAgg+ hands every result the same unmasked, example-weighted mean (float64).
                    mean = [np.asarray(a, np.float64) for a in accepted[0][2]]
                    check_secure_mean(mean, bound, [n for _, n, _ in accepted], s.secagg_max_weight, s.secagg_clip)
                else:
                    mean = aggregate_updates([(a, n) for _, n, a in accepted], s.aggregate)
                new = self._checked_aggregate(mean, bound)
            except UpdateRejected as exc:
                record["note"] = f"the aggregate fails a check ({exc}): round dropped"
        if "note" in record:
            log.warning("round %s: %s", server_round, record["note"])
        record["seconds"] = round(time.perf_counter() - self._started, 3)
        self.rounds.append(record)
        if new is None:
            return None, {}
        record["applied"] = True
        self.global_arrays = new
        return ndarrays_to_parameters(new), {"accepted": len(accepted)}

    def _checked_aggregate(self, mean: list[np.ndarray], bound: float) -> list[np.ndarray]:
        """``global + mean`` once the mean is finite, within what clipping guarantees for the rule,
        and (with ``max_change``) moves no tensor further than allowed; raises UpdateRejected."""
        check_arrays([m.astype(d) for m, d in zip(mean, self.spec.dtypes)], self.spec, "aggregate")
        limit = aggregate_bound("fedavg" if self.settings.secagg else self.settings.aggregate, bound)
        if bound and not self.settings.secagg and norm(mean) > limit * (1 + 1e-6):
            raise UpdateRejected(f"its norm {norm(mean):.4g} exceeds the {limit:.4g} clipping guarantees")
        name, ratio = largest_change(mean, self.global_arrays, self.spec)
        if self.settings.max_change and ratio > self.settings.max_change:
            raise UpdateRejected(f"it moves {name} {ratio:.3g}x its norm, more than the allowed "
                                 f"{self.settings.max_change:g}x")
        new = apply_update(self.global_arrays, mean)
        check_arrays(new, self.spec, "new global adapter")
        return new

    def _check_change(self, server_round: int, node, update) -> None:
        """As ``plug_in --max-change``: refuse (with ``max_change``) or warn about an update that moves
        a tensor further than fine-tuning plausibly does in a round."""
        from ..artifacts import PLAUSIBLE_CHANGE

        name, ratio = largest_change(update, self.global_arrays, self.spec)
        if self.settings.max_change and ratio > self.settings.max_change:
            raise UpdateRejected(f"{name} moved {ratio:.3g}x its norm, more than the allowed {self.settings.max_change:g}x")
        if ratio > PLAUSIBLE_CHANGE:
            log.warning("round %s: client %s moves %s by %.3gx its norm; no plausible fine-tuning round does that",
                        server_round, node, name, ratio)


def _failure_text(failure) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"[:500]
    _, res = failure
    return f"status {res.status.code.name}: {res.status.message}"[:500]


class MeteredGrid(Grid):
    """A ``Grid`` that passes everything to ``inner`` and counts the wire bytes of every message
    sent and received (Flower's protobuf encoding, content included)."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.sent = 0
        self.received = 0

    @staticmethod
    def _size(msg) -> int:
        from flwr.common.serde import message_to_proto

        try:
            return message_to_proto(msg).ByteSize()
        except Exception:  # pragma: no cover - a message Flower itself cannot encode is not ours to count
            return 0

    def set_run(self, run_id):  # pragma: no cover - delegated
        return self.inner.set_run(run_id)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += sum(self._size(m) for m in messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self.inner.pull_messages(message_ids))
        self.received += sum(self._size(m) for m in replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += sum(self._size(m) for m in messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        self.received += sum(self._size(m) for m in replies)
        return replies


def _timed_fit_workflow(timeout: float):
    """Flower's default fit round with a time limit on the replies: a client that never answers
    (disconnected, crashed) is counted as a failure when the limit passes and the round goes on."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Message
    from flwr.app.message_type import MessageType
    from flwr.common import Code
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    def fit_round(grid: Grid, context) -> None:
        rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        chosen = context.strategy.configure_fit(server_round=rnd, parameters=params,
                                                client_manager=context.client_manager)
        if not chosen:
            log.warning("round %s: no clients selected", rnd)
            return
        proxies = {proxy.node_id: proxy for proxy, _ in chosen}
        out = [Message(content=compat.fitins_to_recorddict(ins, True), dst_node_id=proxy.node_id,
                       message_type=MessageType.TRAIN, group_id=str(rnd)) for proxy, ins in chosen]
        replies = list(grid.send_and_receive(out, timeout=timeout))
        # A reply names the message it answers; an error reply the SuperLink writes for a node that
        # is gone may not name that node as its sender, so each reply is matched to its request.
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in out}
        results, failures, answered = [], [], set()
        for msg in replies:
            nid = node_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            answered.add(nid)
            if msg.has_error():
                failures.append(RuntimeError(f"node {nid}: {msg.error.reason}"))
                continue
            res = compat.recorddict_to_fitres(msg.content, False)
            (results if res.status.code == Code.OK else failures).append((proxies[nid], res))
        failures += [TimeoutError(f"node {nid}: no reply within {timeout:g} s") for nid in proxies if nid not in answered]
        aggregated, metrics = context.strategy.aggregate_fit(rnd, results, failures)
        if aggregated is not None:
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(aggregated, True)
            context.history.add_metrics_distributed_fit(server_round=rnd, metrics=metrics)

    return fit_round


def run_federation(grid: Grid, context, emulator: Emulator, settings: FederationSettings,
                   out: str | os.PathLike | None = None, plug_model: str | None = None) -> dict[str, Any]:
    """The model owner's side of a whole run; returns (and, with ``out``, writes) the record."""
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    spec = AdapterSpec.of(emulator)
    initial = to_arrays(emulator, spec)
    strategy = AdapterStrategy(spec, initial, settings)
    metered = MeteredGrid(grid)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=settings.rounds,
                                                        round_timeout=settings.round_timeout),
                           strategy=strategy)
    if settings.secagg:
        fit = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.5, clipping_range=settings.secagg_clip,
                                 max_weight=settings.secagg_max_weight, timeout=settings.round_timeout)
    else:
        fit = _timed_fit_workflow(settings.round_timeout)
    rounds_bytes = []

    def metered_fit(g, ctx):
        before = (metered.sent, metered.received)
        fit(g, ctx)
        rounds_bytes.append((metered.sent - before[0], metered.received - before[1]))

    t0 = time.perf_counter()
    DefaultWorkflow(fit_workflow=metered_fit, evaluate_workflow=lambda g, c: None)(metered, legacy)
    seconds = time.perf_counter() - t0
    for record, (down, up) in zip(strategy.rounds, rounds_bytes):
        record["bytes_sent"], record["bytes_received"] = down, up
    check_arrays(strategy.global_arrays, spec, "final adapter")  # never write or plug a non-finite adapter
    load_arrays(emulator, spec, strategy.global_arrays)
    result = {
        "settings": asdict(settings),
        "adapter": {"tensors": len(spec.names), "parameters": spec.numel, "bytes": spec.nbytes,
                    "fingerprint": spec.fingerprint},
        "emulator": {"method": emulator.manifest.get("method"),
                     "keep_achieved": emulator.manifest.get("size", {}).get("keep_achieved")},
        "rounds": strategy.rounds,
        "rounds_applied": sum(r["applied"] for r in strategy.rounds),
        "seconds": round(seconds, 3),
    }
    if out is not None:
        _write_result(emulator, result, Path(out), plug_model)
    return result


def _write_result(emulator: Emulator, result: dict, out: Path, plug_model: str | None) -> None:
    """``out/adapter`` (an ordinary gradot adapter folder), ``out/federation.json`` and, with
    ``plug_model``, ``out/plugged``; ``out`` appears whole or not at all (replacing an older one)."""
    from ..artifacts import atomic_directory, save_adapter

    training = {"federated": {k: result[k] for k in ("settings", "rounds_applied", "seconds")},
                "mode": "adapter", "emulator_method": result["emulator"]["method"]}
    with atomic_directory(out, overwrite=True) as tmp:
        save_adapter(emulator, tmp / "adapter", training=training)
        if plug_model:
            from ..artifacts import plug_in
            from ..modeling import load_model

            model, tok = load_model(plug_model)
            plug_in(model, tmp / "adapter", k=emulator.manifest["adapter"]["k"])  # every check of `gradot plugin`
            model.save_pretrained(tmp / "plugged")
            tok.save_pretrained(tmp / "plugged")
            result["plugged"] = "plugged"
        (tmp / RECORD_FILE).write_text(json.dumps(result, indent=1))


def make_server_app(load: Callable[[dict], tuple[Emulator, FederationSettings, str | None, str | None]],
                    results: list | None = None) -> ServerApp:
    """A ``ServerApp`` whose ``main`` gets ``(emulator, settings, out, plug_model)`` from
    ``load(run_config)``; each run's record is appended to ``results`` when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context) -> None:
        emulator, settings, out, plug_model = load(dict(context.run_config))
        record = run_federation(grid, context, emulator, settings, out, plug_model)
        if results is not None:
            results.append(record)

    return app


# ---------------------------------------------------------------------------------------------
# Client


class AdapterClient(NumPyClient):
    """A data owner: fine-tunes the global adapter on ``records`` with its own ``emulator``."""

    def __init__(self, emulator: Emulator, tokenizer, records, spec: AdapterSpec | None = None,
                 tamper: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
                 metrics_override: dict | None = None):
        self.emulator, self.tokenizer, self.records = emulator, tokenizer, records
        self.spec = spec or AdapterSpec.of(emulator)
        self.tamper, self.metrics_override = tamper, metrics_override  # tests: a dishonest client

    def get_parameters(self, config):
        return to_arrays(self.emulator, self.spec)

    def fit(self, parameters, config):
        from ..finetune import FinetuneConfig, finetune_adapter

        # The server's message, checked the way plug_into_emulator checks an adapter folder.
        if config.get("fingerprint") != self.spec.fingerprint:
            raise UpdateRejected("the server's adapter is for another base model (fingerprint mismatch)")
        if config.get("spec") != self.spec.digest:
            raise UpdateRejected("the server's adapter has other tensor names, shapes or dtypes than this emulator's")
        check_arrays(parameters, self.spec, "global adapter")
        load_arrays(self.emulator, self.spec, parameters)
        global_arrays = [np.array(a, copy=True) for a in parameters]
        steps = int(config.get("local-steps", 0))
        with tempfile.TemporaryDirectory(prefix="gradot-fed-") as tmp:
            cfg = FinetuneConfig(output_dir=tmp, learning_rate=float(config["lr"]), max_steps=steps or -1,
                                 epochs=float(config.get("local-epochs", 1.0)),
                                 batch_size=int(config["batch-size"]), max_length=int(config["max-length"]),
                                 seed=int(config.get("seed", 0)) + int(config["round"]),
                                 logging_steps=max(1, steps or 10), save_steps=10**9, save_total_limit=1)
            with _proximal(self.emulator, self.spec, global_arrays, float(config.get("mu", 0.0))):
                self.emulator, stats = finetune_adapter(self.emulator, self.tokenizer, self.records, cfg)
        local = to_arrays(self.emulator, self.spec)
        delta = [loc - g for loc, g in zip(local, global_arrays)]
        bound = float(config.get("clip-norm", 0.0))
        if bound > 0:  # the server's clipping bound, applied here too: under SecAgg+ only the client can
            clipped, before = clip_update(delta, bound)
            if before > bound:
                log.info("update norm %.4g clipped to the server's bound %.4g", before, bound)
            delta = [c.astype(d.dtype) for c, d in zip(clipped, delta)]
        clip = float(config.get("secagg-clip", 0.0))
        biggest = max(float(np.abs(d).max()) for d in delta)
        if clip and biggest > clip:
            log.warning("update values reach %.3g, beyond the SecAgg+ clipping range %g: they would be clipped",
                        biggest, clip)
        if self.tamper is not None:
            delta = self.tamper(delta)
        metrics = {"fingerprint": self.spec.fingerprint, "spec": self.spec.digest,
                   "train_loss": float(stats["train_loss"] or 0.0), "seconds": float(stats["seconds"]),
                   "steps": int(stats["steps"])}
        metrics.update(self.metrics_override or {})
        return delta, len(self.records), metrics


class _proximal:
    """FedProx: add ``mu * (w - w_global)`` to every adapter parameter's gradient (the gradient of
    ``mu/2 ||w - w_global||^2``) for the duration of the block; nothing when ``mu`` is 0."""

    def __init__(self, emulator: Emulator, spec: AdapterSpec, global_arrays, mu: float):
        self.handles = []
        if mu <= 0:
            return
        import torch

        params = adapter_parameters_by_name(emulator)
        for name, a in zip(spec.names, global_arrays):
            p = params.get(name)
            if p is None:  # a buffer, not trained
                continue
            anchor = torch.from_numpy(np.ascontiguousarray(a)).to(p.dtype)
            self.handles.append(p.register_hook(lambda g, p=p, anchor=anchor: g + mu * (p.detach() - anchor.to(p.device))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def secagg_when_asked(msg, context, call_next):
    """Flower's ``secaggplus_mod`` for messages of a SecAgg+ round, a pass-through for the rest:
    one ClientApp serves runs with and without secure aggregation (the server decides)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app(get_client: Callable[[Any], AdapterClient]) -> ClientApp:
    """A ``ClientApp`` over ``get_client(context)`` (called per message: cache what it loads)."""
    return ClientApp(client_fn=lambda context: get_client(context).to_client(), mods=[secagg_when_asked])


# ---------------------------------------------------------------------------------------------
# The module-level apps that `flwr run` and `flower-supernode` load (configured by run / node config)

_CACHE: dict[Any, Any] = {}


def _cached(key, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _client_from_context(context) -> AdapterClient:
    from ..artifacts import load_emulator, load_emulator_tokenizer
    from .partition import client_records

    conf = {**dict(context.run_config), **dict(context.node_config)}
    if "emulator" not in conf:
        raise ValueError("the data owner's node config needs emulator='<emulator folder>'")
    emu_dir = str(conf["emulator"])

    def build():
        return load_emulator(emu_dir), load_emulator_tokenizer(emu_dir)

    emulator, tok = _cached(("emulator", emu_dir), build)
    key = tuple(sorted((k, conf.get(k)) for k in NODE_CONFIG))
    records = _cached(("records", key), lambda: client_records(conf))
    return AdapterClient(emulator, tok, records)


def _server_from_run_config(config: dict):
    from ..artifacts import load_emulator

    if "emulator" not in config:
        raise ValueError("the run config needs emulator='<the model owner's emulator folder>'")
    emulator = load_emulator(str(config["emulator"]))
    out = config.get("out") or None
    return emulator, FederationSettings.from_run_config(config), out, config.get("plug-model") or None


server_app = make_server_app(_server_from_run_config)
client_app = make_client_app(_client_from_context)
