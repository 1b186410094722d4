"""The model owner's side of a federation: the strategy that checks, clips and aggregates each round,
the grid that meters and times it, and the ``ServerApp`` (see :mod:`gradot.federated.apps`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from flwr.common import FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.serverapp import Grid, ServerApp

from ..emulator import Emulator
from .core import (
    AdapterSpec,
    UpdateRejected,
    apply_update,
    check_arrays,
    check_update,
    largest_change,
    load_arrays,
    to_arrays,
)
from .robust import (
    aggregate_bound,
    aggregate_updates,
    check_secure_mean,
    clip_update,
    count_cap,
    norm,
)

log = logging.getLogger("gradot.federated.apps")  # one logger for the federation's records

from .settings import FederationSettings, RECORD_FILE


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
