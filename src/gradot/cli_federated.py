"""``gradot federate``: federated offsite-tuning on Flower.

``gradot federate simulate``: the model owner's server and N data owners in this process (Flower's
ServerApp and ClientApp on gradot's in-process runtime), one training set split over the clients.
``gradot federate app``: the Flower App folder for the deployment runtime (``flwr run`` against a
SuperLink that SuperNodes, one per data owner, have joined).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path


def _settings_arguments(p: argparse.ArgumentParser) -> None:
    from .cli_options import int_at_least, positive_int

    g = p.add_argument_group("federation (the model owner's settings, sent to every client each round)")
    g.add_argument("--rounds", type=positive_int, default=3, help="federated rounds")
    g.add_argument("--local-steps", type=int_at_least(0, "an integer >= 0"), default=10,
                   help="optimizer steps each client runs per round (0: --local-epochs decide)")
    g.add_argument("--local-epochs", type=float, default=1.0, help="passes over its data per round when --local-steps is 0")
    g.add_argument("--lr", type=float, default=1e-4, help="clients' learning rate (AdamW restarts every round)")
    g.add_argument("--train-batch-size", type=positive_int, default=8, help="examples per step")
    g.add_argument("--max-length", type=int_at_least(2, "an integer >= 2"), default=256, help="tokens per example")
    g.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight (0: plain FedAvg)")
    g.add_argument("--min-clients", type=positive_int, default=2,
                   help="quorum: a round with fewer accepted updates keeps the previous adapter")
    g.add_argument("--round-timeout", type=float, default=3600.0,
                   help="seconds the server waits for a round's replies (silent clients count as failed)")
    g.add_argument("--secagg", action="store_true",
                   help="Flower's SecAgg+ (the server sees only the sum of the updates, never one client's)")
    g.add_argument("--secagg-clip", type=float, default=1.0,
                   help="SecAgg+ clipping range of each update value (updates are weight differences, ~1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of local training (plus the round)")
    g.add_argument("--max-change", type=float, default=0.0,
                   help="leave out an update that moves a tensor more than this many times its norm (0: only warn "
                        "above 1, as plugin does)")


def _settings(args, **extra):
    from .federated.apps import FederationSettings

    return FederationSettings(rounds=args.rounds, local_steps=args.local_steps, local_epochs=args.local_epochs,
                              lr=args.lr, batch_size=args.train_batch_size, max_length=args.max_length, mu=args.mu,
                              min_clients=args.min_clients, round_timeout=args.round_timeout, secagg=args.secagg,
                              secagg_clip=args.secagg_clip, seed=args.seed, max_change=args.max_change, **extra)


def add_commands(sub) -> None:
    from .cli_options import positive_int
    from .federated.partition import PARTITIONS

    p = sub.add_parser("federate", help="many data owners, one adapter: federated offsite-tuning on Flower")
    fsub = p.add_subparsers(dest="federate_command", required=True)

    s = fsub.add_parser("simulate", help="server and N clients in this process (Flower apps, in-process nodes)")
    s.add_argument("--emulator", required=True, help="the emulator folder (every simulated data owner gets it)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task's train split, split over the clients")
    src.add_argument("--data", help="your own data file (.txt, JSONL with 'text', Alpaca JSON), split IID")
    s.add_argument("--data-dir", default=None, help="folder with the task files (default: the shared data)")
    s.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training rows in all")
    s.add_argument("--num-clients", type=positive_int, default=3, help="simulated data owners")
    s.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="iid: equal random shares; label: label skew, Dirichlet(--alpha) per label (tasks only)")
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of --partition label")
    s.add_argument("--out", required=True, help="output folder: adapter/ (the aggregate) and federation.json")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--plug-model", default=None,
                   help="also plug the aggregate into this model ('default', a folder, a .gguf) and write OUT/plugged")
    _settings_arguments(s)
    s.set_defaults(handler=cmd_simulate)

    a = fsub.add_parser("app", help="write the Flower App folder for `flwr run` (deployment runtime)")
    a.add_argument("folder", help="folder to write pyproject.toml into")
    a.add_argument("--emulator", required=True, help="the model owner's emulator folder (absolute path recommended)")
    a.add_argument("--out", required=True, help="where the server writes adapter/ and federation.json")
    a.add_argument("--min-available", type=positive_int, default=2, help="SuperNodes to wait for before round 1")
    _settings_arguments(a)
    a.set_defaults(handler=cmd_app)


def _quiet_flower(verbose: bool) -> None:
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def cmd_simulate(args) -> int:
    from .artifacts import atomic_directory, load_emulator, load_emulator_tokenizer, refuse_existing
    from .errors import UsageError
    from .progress import stage
    from .federated.apps import AdapterClient, make_client_app, make_server_app
    from .federated.partition import client_records
    from .federated.runtime import run_local

    _quiet_flower(getattr(args, "verbose", False))
    if args.partition == "label" and not args.task:
        raise UsageError("--partition label needs --task (own data has no labels)")
    refuse_existing(args.out, args.overwrite)
    conf = {"task": args.task, "data": args.data, "data-dir": args.data_dir, "train-limit": args.train_limit,
            "num-partitions": args.num_clients, "partition": args.partition, "alpha": args.alpha, "seed": args.seed}
    try:
        shares = [client_records({**conf, "partition-id": i}) for i in range(args.num_clients)]
        settings = _settings(args, min_available=args.num_clients,
                             secagg_max_weight=float(max(len(r) for r in shares)))
    except ValueError as exc:
        if type(exc) is not ValueError:
            raise
        raise UsageError(str(exc)) from None
    with atomic_directory(args.out, args.overwrite) as tmp:  # a failed run leaves no (or the old) --out
        with stage(f"loading emulator {args.emulator}"):
            emulator = load_emulator(args.emulator)
            tok = load_emulator_tokenizer(args.emulator)
        out = tmp / "run"
        results: list[dict] = []
        # One emulator in memory for everyone: the server reads its adapter first, and each client
        # loads the global adapter before it trains (nodes run one at a time).
        server = make_server_app(lambda config: (emulator, settings, out, args.plug_model), results)
        client = make_client_app(lambda context: AdapterClient(emulator, tok, shares[int(context.node_config["partition-id"])]))
        t0 = time.perf_counter()
        run_local(server, client, args.num_clients)
        record = results[0]
        record.update(command="gradot " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                      clients=[len(r) for r in shares], partition=args.partition, alpha=args.alpha,
                      task=args.task, wall_seconds=round(time.perf_counter() - t0, 2))
        (out / "federation.json").write_text(json.dumps(record, indent=1))
        for item in out.iterdir():
            item.rename(tmp / item.name)
        out.rmdir()
    for r in record["rounds"]:
        left = f", {len(r['excluded'])} left out" if r["excluded"] else ""
        failed = f", {len(r['failures'])} failed" if r["failures"] else ""
        print(f"round {r['round']}: {len(r['accepted'])} clients accepted{left}{failed}, "
              f"{r['seconds']:.1f} s, {r['bytes_sent'] / 2**20:.1f} MiB sent, {r['bytes_received'] / 2**20:.1f} MiB received"
              + ("" if r["applied"] else f" ({r.get('note', 'not applied')})"))
    print(f"federated adapter written to {args.out}/adapter ({record['rounds_applied']} of {args.rounds} rounds "
          f"applied, {args.num_clients} clients, {record['seconds']:.0f} s); record: {args.out}/federation.json")
    return 0


def cmd_app(args) -> int:
    from .errors import UsageError
    from .federated.deploy import write_flower_app

    try:
        s = _settings(args, min_available=args.min_available)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from dataclasses import asdict

    folder = write_flower_app(args.folder, emulator=str(Path(args.emulator).resolve()),
                              out=str(Path(args.out).resolve()), **asdict(s))
    print(f"Flower App written to {folder}/pyproject.toml; submit it with: flwr run {folder} <superlink connection> --stream")
    return 0
