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

from typing import Any

from .client import AdapterClient, make_client_app, secagg_when_asked  # noqa: F401  (re-exported)
from .server import AdapterStrategy, MeteredGrid, make_server_app, run_federation  # noqa: F401  (re-exported)
from .settings import NODE_CONFIG, RECORD_FILE, RUN_CONFIG, FederationSettings  # noqa: F401  (re-exported)

__all__ = [
    "AdapterClient",
    "AdapterStrategy",
    "FederationSettings",
    "client_app",
    "make_client_app",
    "make_server_app",
    "server_app",
]


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
