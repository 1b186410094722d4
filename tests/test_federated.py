"""Federated offsite-tuning on Flower (gradot.federated): tiny random models, in-process nodes."""


import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from gradot.methods.uniform import uniform_emulator
from gradot.federated.apps import AdapterClient, FederationSettings, make_client_app, make_server_app
from gradot.federated.core import AdapterSpec, to_arrays
from gradot.federated.partition import partition_indices
from gradot.federated.runtime import run_local
from gradot.finetune import FinetuneConfig, finetune_adapter
from gradot.split import split_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

WORDS = "a b c d e f g h i j k l m n o p q r s t u v w x y z the of and to in is was for on as with by at".split()


def _records(n, seed):
    rng = np.random.default_rng(seed)
    return [(f"Question : {' '.join(rng.choice(WORDS, 4))} Answer :", " " + " ".join(rng.choice(WORDS, 2)))
            for _ in range(n)]


#: Three data owners of different sizes, so the weighting by example counts shows.
DATA = [_records(2, 1), _records(4, 2), _records(6, 3)]


def _emulator(seed=0):
    model = tiny_model("llama", seed=seed)
    return uniform_emulator(model, split_model(model, 2), 0.5)


def _settings(**kw):
    """The tests' federation; clip=0 (no clipping) and max_change=0 (no change bound) unless a test sets
    them, so that the aggregate is exactly FedAvg's and each defence is tested where it is set."""
    base = dict(rounds=1, local_steps=2, lr=1e-2, batch_size=2, max_length=32, min_clients=2, min_available=2,
                round_timeout=60, seed=0, clip=0.0, max_change=0.0)
    base.update(kw)
    return FederationSettings(**base)


def _federate(settings, clients, drop=None):
    """Run the server against in-process nodes; ``clients[i]`` is node i's AdapterClient."""
    server_emu = _emulator()
    results = []
    server = make_server_app(lambda config: (server_emu, settings, None, None), results)
    client = make_client_app(lambda context: clients[int(context.node_config["partition-id"])])
    run_local(server, client, len(clients), drop=drop)
    spec = AdapterSpec.of(server_emu)
    return results[0], to_arrays(server_emu, spec), spec


def _honest(data, emulator=None):
    return AdapterClient(emulator or _emulator(), tiny_tokenizer(), data)


def _local_update(records, settings, tmp_path, name):
    """What one client's local training gives, computed outside Flower."""
    emu = _emulator()
    spec = AdapterSpec.of(emu)
    before = to_arrays(emu, spec)
    cfg = FinetuneConfig(output_dir=str(tmp_path / name), learning_rate=settings.lr, max_steps=settings.local_steps,
                         batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed + 1,
                         save_steps=10**9)
    finetune_adapter(emu, tiny_tokenizer(), records, cfg)
    return [a - b for a, b in zip(to_arrays(emu, spec), before)], before


def _hand_average(datasets, settings, tmp_path):
    updates = [_local_update(d, settings, tmp_path, f"c{i}") for i, d in enumerate(datasets)]
    start = updates[0][1]
    total = sum(len(d) for d in datasets)
    return [s + sum(len(d) / total * u[0][j] for d, u in zip(datasets, updates)) for j, s in enumerate(start)]


def _close(a, b, atol):
    return max(float(np.abs(x.astype(np.float64) - y).max()) for x, y in zip(a, b)) <= atol


def test_three_clients_reach_the_hand_computed_weighted_average(tmp_path):
    settings = _settings()
    record, final, _ = _federate(settings, [_honest(d) for d in DATA])
    expected = _hand_average(DATA, settings, tmp_path)
    assert record["rounds_applied"] == 1 and len(record["rounds"][0]["accepted"]) == 3
    assert sorted(a["examples"] for a in record["rounds"][0]["accepted"]) == [2, 4, 6]
    assert _close(final, expected, 1e-6)
    start = to_arrays(_emulator(), AdapterSpec.of(_emulator()))
    assert not _close(final, start, 1e-4)  # it trained
    assert record["rounds"][0]["bytes_sent"] > 3 * AdapterSpec.of(_emulator()).nbytes


def test_dishonest_clients_are_left_out_and_the_honest_average_stands(tmp_path, caplog):
    def nan(delta):
        delta[0] = delta[0].copy()
        delta[0].flat[0] = np.nan
        return delta

    def reshaped(delta):
        delta[1] = delta[1].reshape(-1)[:-1]
        return delta

    clients = [_honest(DATA[0]), _honest(DATA[2]),
               AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=nan),
               AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=reshaped),
               AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], metrics_override={"fingerprint": "0" * 64})]
    settings = _settings(min_available=5)
    with caplog.at_level(logging.WARNING, logger="gradot.federated.apps"):
        record, final, _ = _federate(settings, clients)
    rnd = record["rounds"][0]
    assert len(rnd["accepted"]) == 2 and len(rnd["excluded"]) == 3
    reasons = " | ".join(e["reason"] for e in rnd["excluded"])
    assert "NaN" in reasons and "shape" in reasons and "fingerprint" in reasons
    assert "left out" in caplog.text
    assert _close(final, _hand_average([DATA[0], DATA[2]], settings, tmp_path), 1e-6)


def test_a_client_that_disconnects_mid_round_does_not_stop_the_run():
    clients = [_honest(d) for d in DATA]
    # Node 2 takes round 1's message, trains, and is gone before its reply arrives.
    record, final, _ = _federate(_settings(rounds=2), clients, drop={2: 1})
    assert record["rounds_applied"] == 2
    first = record["rounds"][0]
    assert len(first["accepted"]) == 2 and any("no reply" in f for f in first["failures"])
    assert all(np.isfinite(a).all() for a in final)


def test_an_implausibly_large_update_is_left_out_under_max_change(caplog):
    def huge(delta):
        return [d * 1e4 for d in delta]

    clients = [_honest(DATA[0]), _honest(DATA[2]), AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=huge)]
    with caplog.at_level(logging.WARNING, logger="gradot.federated.apps"):
        record, _, _ = _federate(_settings(min_available=3, max_change=0.0), clients)  # the bound turned off
    assert len(record["rounds"][0]["accepted"]) == 3 and "no plausible" in caplog.text  # warned, as plug_in
    from dataclasses import fields

    from gradot.artifacts import DEFAULT_MAX_CHANGE

    assert next(f.default for f in fields(FederationSettings) if f.name == "max_change") == DEFAULT_MAX_CHANGE
    for settings in (_settings(min_available=3, max_change=DEFAULT_MAX_CHANGE), _settings(min_available=3, max_change=1.0)):
        record, _, _ = _federate(settings, clients)
        rnd = record["rounds"][0]
        assert len(rnd["accepted"]) == 2 and "more than the allowed" in rnd["excluded"][0]["reason"]


def test_a_round_below_the_quorum_keeps_the_adapter():
    def nan(delta):
        return [np.full_like(d, np.nan) for d in delta]

    clients = [_honest(DATA[0]), AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=nan)]
    record, final, spec = _federate(_settings(min_clients=2), clients)
    assert record["rounds_applied"] == 0 and "quorum" in record["rounds"][0]["note"]
    assert _close(final, to_arrays(_emulator(), spec), 0)


def test_secagg_plus_gives_plain_fedavgs_aggregate_within_quantisation():
    plain, final_plain, spec = _federate(_settings(), [_honest(d) for d in DATA])
    secure, final_secure, _ = _federate(_settings(secagg=True, secagg_clip=0.5, secagg_max_weight=16),
                                        [_honest(d) for d in DATA])
    assert secure["rounds_applied"] == 1 and len(secure["rounds"][0]["accepted"]) == 3
    # Each value is quantised to 2**22 levels over [-clip, clip] per client, the weights to 2**22
    # levels of max_weight: a few 1e-7 here; the updates themselves are ~1e-2.
    step = 2 * 0.5 / 2**22
    assert _close(final_secure, final_plain, 3 * step * 4)
    assert not _close(final_plain, to_arrays(_emulator(), spec), 1e-4)


def test_fedprox_pulls_towards_the_global_adapter():
    plain, final_plain, spec = _federate(_settings(local_steps=3), [_honest(d) for d in DATA])
    prox, final_prox, _ = _federate(_settings(local_steps=3, mu=50.0), [_honest(d) for d in DATA])
    start = to_arrays(_emulator(), spec)

    def moved(final):
        return sum(float(np.linalg.norm(f.astype(np.float64) - s)) for f, s in zip(final, start))

    assert 0 < moved(final_prox) < moved(final_plain)


def test_partitions_are_disjoint_and_cover_the_rows():
    labels = [i % 4 for i in range(200)]
    for how in ("iid", "label"):
        parts = partition_indices(200, 5, how, labels, alpha=0.3, seed=1)
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(200)) and all(parts)
    iid = partition_indices(200, 5, "iid", seed=1)
    assert {len(p) for p in iid} == {40}
    skew = partition_indices(200, 5, "label", labels, alpha=0.1, seed=1)
    top = [max(np.bincount([labels[i] for i in p], minlength=4)) / len(p) for p in skew]
    assert np.mean(top) > 0.5  # label skew: most of a client's rows share one label


def test_cli_simulate_writes_a_pluggable_adapter_and_a_record(tiny_model_dir, tmp_path, capsys):
    import json

    from gradot.cli import main

    assert main(["compress", "--model", str(tiny_model_dir), "--keep", "0.5", "--out", str(tmp_path / "emu")]) == 0
    data = tmp_path / "data.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 10))}) + "\n" for _ in range(9)))
    argv = ["federate", "simulate", "--emulator", str(tmp_path / "emu"), "--data", str(data), "--num-clients", "3",
            "--rounds", "2", "--local-steps", "1", "--lr", "1e-2", "--train-batch-size", "2", "--max-length", "32",
            "--out", str(tmp_path / "fed")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "round 2: 3 clients accepted" in out and "2 of 2 rounds applied" in out
    record = json.loads((tmp_path / "fed" / "federation.json").read_text())
    assert record["clients"] == [3, 3, 3] and record["rounds_applied"] == 2 and record["command"].startswith("gradot")
    assert main(["plugin", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "fed" / "adapter"),
                 "--emulator", str(tmp_path / "emu"), "--out", str(tmp_path / "plugged")]) == 0
    assert main(argv) == 2  # --out exists
    assert "--overwrite" in capsys.readouterr().err
    bad = argv[:-2] + ["--partition", "label", "--out", str(tmp_path / "fed2")]
    assert main(bad) == 2 and "--partition label needs --task" in capsys.readouterr().err
    assert not (tmp_path / "fed2").exists()


def test_cli_app_writes_the_flower_app(tmp_path, capsys):
    import tomllib

    from gradot.cli import main

    assert main(["federate", "app", str(tmp_path / "app"), "--emulator", "emu", "--out", "fed", "--rounds", "4",
                 "--secagg", "--mu", "0.01"]) == 0
    conf = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert conf["tool"]["flwr"]["app"]["components"]["serverapp"] == "gradot.federated.apps:server_app"
    run = conf["tool"]["flwr"]["app"]["config"]
    assert run["num-rounds"] == 4 and run["secagg"] is True and run["mu"] == 0.01
    assert Path(run["emulator"]).is_absolute()
    from gradot.federated.apps import FederationSettings

    assert FederationSettings.from_run_config(run).rounds == 4


def test_flower_telemetry_is_off_wherever_gradot_starts_flower():
    """Flower reads FLWR_TELEMETRY_ENABLED once, on import: gradot.federated sets it to 0 first."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    code = ("import gradot.federated.apps, os; from flwr.supercore import telemetry; "
            "print(os.environ['FLWR_TELEMETRY_ENABLED'], telemetry.FLWR_TELEMETRY_ENABLED)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "0"]


def test_federate_lr_defaults_to_finetunes_rate():
    import argparse

    from gradot.cli.data_owner import _federation_arguments
    from gradot.federated.commands import _settings
    from gradot.finetune import default_learning_rate

    p = argparse.ArgumentParser()
    _federation_arguments(p)
    settings = _settings(p.parse_args([]))
    assert settings.lr == default_learning_rate(None) == FederationSettings().lr
    assert _settings(p.parse_args(["--lr", "1e-3"])).lr == 1e-3


def test_federate_cli_defaults_are_the_settings_defaults():
    """What the command line leaves unset is FederationSettings' default (one place for each)."""
    import argparse

    from gradot.cli.data_owner import _federation_arguments
    from gradot.federated.commands import _settings

    p = argparse.ArgumentParser()
    _federation_arguments(p)
    got, want = _settings(p.parse_args([])), FederationSettings()
    for name in ("round_timeout", "clip", "max_examples", "max_examples_ratio", "aggregate", "lr"):
        assert getattr(got, name) == getattr(want, name), name
    assert _settings(p.parse_args(["--round-timeout", "30", "--clip", "0"])).round_timeout == 30


# ---------------------------------------------------------------------------------------------
# One hostile data owner among three: what it claims and sends is refused or bounded.


class _Claims(AdapterClient):
    """A dishonest data owner: trains honestly, then claims ``count`` examples."""

    def __init__(self, *args, count, **kw):
        super().__init__(*args, **kw)
        self.count = count

    def fit(self, parameters, config):
        delta, _, metrics = super().fit(parameters, config)
        return delta, self.count, metrics


def _change(final, start):
    return float(np.sqrt(sum(np.sum((f.astype(np.float64) - s) ** 2) for f, s in zip(final, start))))


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_an_inflated_example_count_is_refused(secagg, caplog):
    clients = [_honest(DATA[0]), _honest(DATA[2]), _Claims(_emulator(), tiny_tokenizer(), DATA[1], count=10**9)]
    extra = {"secagg": True, "secagg_clip": 0.5, "secagg_max_weight": 16} if secagg else {}
    with caplog.at_level(logging.WARNING, logger="gradot.federated.apps"):
        record, final, spec = _federate(_settings(min_available=3, **extra), clients)
    rnd = record["rounds"][0]
    assert len(rnd["excluded"]) == 1 and "1000000000 examples, above this round's cap" in rnd["excluded"][0]["reason"]
    assert "left out" in caplog.text
    if secagg:  # its masked update is already in the sum: the round is dropped, the adapter kept
        assert not rnd["applied"] and "round dropped" in rnd["note"]
        assert _close(final, to_arrays(_emulator(), spec), 0)
    else:
        assert rnd["applied"] and sorted(a["examples"] for a in rnd["accepted"]) == [2, 6]


def test_a_count_above_secagg_max_weight_is_refused():
    clients = [_honest(DATA[0]), _honest(DATA[2]), _Claims(_emulator(), tiny_tokenizer(), DATA[1], count=20)]
    record, _, _ = _federate(_settings(min_available=3, secagg=True, secagg_clip=0.5, secagg_max_weight=16,
                                       max_examples_ratio=0), clients)
    rnd = record["rounds"][0]
    assert not rnd["applied"] and "claims 20 examples" in rnd["excluded"][0]["reason"]


def test_clipping_bounds_what_a_scaled_update_moves(caplog):
    """A x100 update (and a x1e4 one that --max-change would refuse) is clipped to the bound, so the
    aggregate moves no further from the honest one than the hostile client's share of it."""
    honest, honest_final, spec = _federate(_settings(min_available=2, clip=0.5), [_honest(DATA[0]), _honest(DATA[2])])
    start = to_arrays(_emulator(), spec)
    bound = 0.5 * _change(start, [np.zeros_like(s, dtype=np.float64) for s in start])
    for scale in (100, 1e4):
        hostile = AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=lambda d, s=scale: [x * s for x in d])
        with caplog.at_level(logging.WARNING, logger="gradot.federated.apps"):
            record, final, _ = _federate(_settings(min_available=3, clip=0.5),
                                         [_honest(DATA[0]), _honest(DATA[2]), hostile])
        rnd = record["rounds"][0]
        assert rnd["applied"] and {a["examples"]: a["clipped"] for a in rnd["accepted"]} == {2: False, 6: False, 4: True}
        assert "clipped to" in caplog.text
        assert _change(final, start) <= bound * (1 + 1e-5)
        # Its weight is 4/12; honest updates are ~0.14 of the adapter's norm, its is clipped to 0.5.
        assert _change(final, honest_final) <= bound * (1 + 0.3)


def test_a_single_huge_value_never_reaches_the_adapter():
    def huge(delta):
        delta[0] = delta[0].copy()
        delta[0].flat[0] = 1e30
        return delta

    clients = [_honest(DATA[0]), _honest(DATA[2]), AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=huge)]
    record, final, spec = _federate(_settings(rounds=2, min_available=3, clip=0.5), clients)
    start = to_arrays(_emulator(), spec)
    assert record["rounds_applied"] == 2 and all(len(r["accepted"]) == 3 for r in record["rounds"])
    assert all(np.isfinite(a).all() for a in final)
    # Clipping bounds the L2 norm of each update, so of each round's mean: the value may take that
    # whole budget (the hostile client's share of it), but no more.
    bound = 0.5 * _change(start, [0 * s for s in start])
    assert all({a["examples"]: a["clipped"] for a in r["accepted"]}[4] for r in record["rounds"])
    assert _change(final, start) <= 2 * bound * (1 + 1e-5)


@pytest.mark.parametrize("how", ["one", "all"])
def test_nan_under_secagg_drops_the_round(how, caplog):
    def nan(delta):
        if how == "all":
            return [np.full_like(d, np.nan) for d in delta]
        delta[0] = delta[0].copy()
        delta[0].flat[0] = np.nan
        return delta

    clients = [_honest(DATA[0]), _honest(DATA[2]), AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=nan)]
    with caplog.at_level(logging.WARNING, logger="gradot.federated.apps"):
        record, final, spec = _federate(_settings(min_available=3, secagg=True, secagg_clip=0.5, secagg_max_weight=16,
                                                  clip=0.5), clients)
    rnd = record["rounds"][0]
    assert not rnd["applied"] and "round dropped" in rnd["note"] and "round dropped" in caplog.text
    assert _close(final, to_arrays(_emulator(), spec), 0)


def test_secagg_with_honest_clipped_clients_is_applied():
    record, final, spec = _federate(_settings(secagg=True, secagg_clip=0.5, secagg_max_weight=16, clip=0.05),
                                    [_honest(d) for d in DATA])
    assert record["rounds_applied"] == 1
    start = to_arrays(_emulator(), spec)
    assert 0 < _change(final, start) <= 0.05 * _change(start, [0 * s for s in start]) * 1.01


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed-mean", "krum"])
def test_each_aggregation_rule_runs_behind_the_checks(rule):
    def nan(delta):
        return [np.full_like(d, np.nan) for d in delta]

    clients = [_honest(DATA[0]), _honest(DATA[2]), _honest(DATA[1]),
               AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=nan)]
    record, final, spec = _federate(_settings(min_available=4, aggregate=rule, clip=0.5), clients)
    rnd = record["rounds"][0]
    assert rnd["applied"] and len(rnd["accepted"]) == 3 and "NaN" in rnd["excluded"][0]["reason"]
    assert not _close(final, to_arrays(_emulator(), spec), 1e-4)


def test_robust_rules_resist_a_scaled_update_that_fedavg_lets_in():
    def three_and(fourth):
        return [_honest(DATA[0]), _honest(DATA[2]), _honest(DATA[1]), fourth]

    moved = {}
    for rule in ("fedavg", "median", "krum"):
        _, honest, spec = _federate(_settings(min_available=4, aggregate=rule, clip=0), three_and(_honest(DATA[1])))
        hostile = AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=lambda d: [x * -50 for x in d])
        _, attacked, _ = _federate(_settings(min_available=4, aggregate=rule, clip=0), three_and(hostile))
        moved[rule] = _change(attacked, honest) / _change(honest, to_arrays(_emulator(), spec))
    assert moved["fedavg"] > 5 and moved["median"] < 1.5 and moved["krum"] < 1.5, moved


def test_robust_rules_are_refused_under_secagg():
    with pytest.raises(ValueError, match="fedavg only"):
        FederationSettings(secagg=True, aggregate="median")


def test_a_hanging_client_costs_one_timeout_and_is_named_once():
    import time

    def hang(delta):
        time.sleep(12)
        return delta

    clients = [_honest(DATA[0]), _honest(DATA[2]), AdapterClient(_emulator(), tiny_tokenizer(), DATA[1], tamper=hang)]
    t0 = time.monotonic()
    record, _, _ = _federate(_settings(rounds=2, min_available=3, round_timeout=4), clients)
    first, second = record["rounds"]
    assert first["applied"] and sorted(a["examples"] for a in first["accepted"]) == [2, 6]
    assert len(first["failures"]) == 1 and "no reply within 4 s" in first["failures"][0]
    # Round 2 goes on with the two that remain (min_available holds round 1 only).
    assert second["applied"] and len(second["accepted"]) == 2
    assert time.monotonic() - t0 < 20  # it did not wait for the hanging client


def test_default_round_timeout_is_minutes():
    assert 60 <= FederationSettings().round_timeout <= 1800


def test_a_node_the_superlink_reports_gone_is_one_named_failure(monkeypatch):
    """A SuperLink answers for a node that is gone with an error reply from itself (node 0) that
    names the message it answers: the failure is the node's, recorded once, with the reason."""
    from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

    from gradot.federated.runtime import LocalGrid

    deliver = LocalGrid._deliver

    def gone_node_2(self, msg):
        if self.contexts[msg.metadata.dst_node_id].node_config["partition-id"] == 2:
            return create_message_error_unavailable_res_message(msg.metadata, "node_unavail")
        return deliver(self, msg)

    monkeypatch.setattr(LocalGrid, "_deliver", gone_node_2)
    record, _, _ = _federate(_settings(min_available=3), [_honest(d) for d in DATA])
    rnd = record["rounds"][0]
    assert rnd["applied"] and len(rnd["accepted"]) == 2
    assert len(rnd["failures"]) == 1 and "no reply" not in rnd["failures"][0]
    assert "Node Unavailable" in rnd["failures"][0] and "node 0:" not in rnd["failures"][0]


def test_max_change_refuses_the_aggregate_too():
    """Under SecAgg+ no single update can be measured: --max-change then holds on the unmasked mean."""
    record, final, spec = _federate(_settings(secagg=True, secagg_clip=0.5, secagg_max_weight=16, max_change=1e-6),
                                    [_honest(d) for d in DATA])
    rnd = record["rounds"][0]
    assert not rnd["applied"] and "more than the allowed 1e-06x" in rnd["note"]
    assert _close(final, to_arrays(_emulator(), spec), 0)
