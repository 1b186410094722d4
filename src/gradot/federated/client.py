"""The data owner's side of a federation: the client that checks the global adapter, fine-tunes it on
its own data and replies with the update, and the ``ClientApp`` (see :mod:`gradot.federated.apps`)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from ..emulator import Emulator
from .core import (
    AdapterSpec,
    UpdateRejected,
    adapter_parameters_by_name,
    check_arrays,
    load_arrays,
    to_arrays,
)
from .robust import (
    clip_update,
)

log = logging.getLogger("gradot.federated.apps")  # one logger for the federation's records



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
