"""``gradot federate simulate`` and ``gradot federate app``: what the commands do (their options
are declared with the other commands', in ``gradot.cli.data_owner``).

``simulate``: the model owner's server and N data owners in this process (Flower's ServerApp and
ClientApp on gradot's in-process runtime), one training set split over the clients. ``app``: the
Flower App folder for the deployment runtime (``flwr run`` against a SuperLink that SuperNodes,
one per data owner, have joined).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from pathlib import Path


def _settings(args, **extra):
    from .apps import FederationSettings

    # Options left unset take FederationSettings' defaults (the lr: gradot finetune's rate).
    for option, name in (("lr", "lr"), ("clip", "clip"), ("max_examples", "max_examples"),
                         ("max_examples_ratio", "max_examples_ratio"), ("round_timeout", "round_timeout")):
        if getattr(args, option, None) is not None:
            extra[name] = getattr(args, option)
    extra.setdefault("aggregate", getattr(args, "aggregate", "fedavg"))
    return FederationSettings(rounds=args.rounds, local_steps=args.local_steps, local_epochs=args.local_epochs,
                              batch_size=args.train_batch_size, max_length=args.max_length, mu=args.mu,
                              min_clients=args.min_clients, secagg=args.secagg,
                              secagg_clip=args.secagg_clip, seed=args.seed, max_change=args.max_change, **extra)


def _quiet_flower(verbose: bool) -> None:
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)


def cmd_simulate(args) -> int:
    from ..artifacts import atomic_directory, load_emulator, load_emulator_tokenizer, refuse_existing
    from ..errors import UsageError
    from ..progress import stage
    from .apps import AdapterClient, make_client_app, make_server_app
    from .partition import client_records
    from .runtime import run_local

    _quiet_flower(getattr(args, "verbose", False))
    if args.partition == "label" and not args.task:
        raise UsageError("--partition label needs --task (own data has no labels)")
    refuse_existing(args.out, args.overwrite)
    conf = {"task": args.task, "data": args.data, "data-dir": args.data_dir, "train-limit": args.train_limit,
            "num-partitions": args.num_clients, "partition": args.partition, "alpha": args.alpha, "seed": args.seed}
    try:
        shares = [client_records({**conf, "partition-id": i}) for i in range(args.num_clients)]
        # The model owner split the data: no client may claim more than the largest share.
        largest = max(len(r) for r in shares)
        settings = _settings(args, min_available=args.num_clients, secagg_max_weight=float(largest),
                             **({} if args.max_examples is not None else {"max_examples": largest}))
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
    from ..errors import UsageError
    from .deploy import write_flower_app

    try:
        s = _settings(args, min_available=args.min_available)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from dataclasses import asdict

    folder = write_flower_app(args.folder, emulator=str(Path(args.emulator).resolve()),
                              out=str(Path(args.out).resolve()), **asdict(s))
    print(f"Flower App written to {folder}/pyproject.toml; submit it with: flwr run {folder} <superlink connection> --stream")
    return 0
