"""Flower's deployment runtime: a SuperLink and two SuperNodes as separate processes on loopback,
`flwr run` submits gradot's Flower App, 2 rounds run, everything is shut down (bounded in time)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import tiny_model, tiny_tokenizer

from gradot.artifacts import plug_in, save_emulator
from gradot.methods.uniform import uniform_emulator
from gradot.federated.deploy import write_flower_app
from gradot.split import split_model

BIN = Path(sys.executable).parent
#: Seconds the whole federation may take (it needs about 70 s on a busy 2-core CPU).
LIMIT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"exited early: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} not open after {seconds} s: {log.read_text()[-2000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """Each server was started in its own session: end its whole group (its SuperExec and app
    processes too), politely first."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        for p in procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def _words_file(path: Path, rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = "a b c d e f g h i j the of and to".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 12))}) + "\n" for _ in range(rows)))
    return path


def _deploy(tmp_path, node_configs: list[str], **settings):
    """Save a tiny emulator, start a SuperLink and one SuperNode per node config on loopback
    (telemetry off), submit gradot's Flower App with ``flwr run``, stop everything; returns
    (model, the output folder)."""
    model = tiny_model("llama")
    emu_dir, out = tmp_path / "emu", tmp_path / "out"
    save_emulator(uniform_emulator(model, split_model(model, 2), 0.5), emu_dir, tokenizer=tiny_tokenizer())
    app = write_flower_app(tmp_path / "app", emulator=str(emu_dir), out=str(out), **settings)

    link = _free_port()
    home = tmp_path / "flwr-home"  # the flwr CLI's connection config, and where apps get installed
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen] = []

    def start(name, argv):
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                          start_new_session=True))
        return procs[-1], log

    t0 = time.monotonic()
    try:
        sl, sl_log = start("superlink", [BIN / "flower-superlink", "--insecure", "--host", "127.0.0.1",
                                         "--port", str(link), "--database", ":flwr-in-memory:"])
        _wait_for_port(link, sl, sl_log)
        for i, conf in enumerate(node_configs):
            start(f"supernode{i}", [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--host", "127.0.0.1", "--port", str(_free_port()), "--node-config",
                                    f"emulator='{emu_dir}' {conf}"])
        run = subprocess.run([BIN / "flwr", "run", str(app), "test", "--stream"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=LIMIT)
        assert (out / "federation.json").is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)  # everything is down
    assert time.monotonic() - t0 < LIMIT + 60
    return model, out


def test_superlink_and_two_supernodes_run_two_rounds_and_shut_down(tmp_path):
    data = _words_file(tmp_path / "data.jsonl", 8)
    model, out = _deploy(tmp_path, [f"data='{data}' partition-id={i} num-partitions=2" for i in range(2)],
                         rounds=2, local_steps=1, lr=1e-2, batch_size=2, max_length=32, round_timeout=120)
    record = json.loads((out / "federation.json").read_text())
    assert record["rounds_applied"] == 2
    assert [len(r["accepted"]) for r in record["rounds"]] == [2, 2]
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in record["rounds"])
    plug_in(model, out / "adapter", k=2)  # the aggregate is an ordinary adapter: plug_in accepts it


def test_a_count_above_the_cap_is_refused_in_deployment(tmp_path):
    """One SuperNode claims 40 examples, the other 4; the model owner's cap is 10 (--max-examples):
    the large claim is left out with its reason, the round goes on with the other (quorum 1)."""
    small, large = _words_file(tmp_path / "small.jsonl", 4, 1), _words_file(tmp_path / "large.jsonl", 40, 2)
    _, out = _deploy(tmp_path, [f"data='{small}'", f"data='{large}'"], rounds=1, local_steps=1, lr=1e-2,
                     batch_size=2, max_length=32, round_timeout=120, min_clients=1, min_available=2, max_examples=10)
    rnd = json.loads((out / "federation.json").read_text())["rounds"][0]
    assert rnd["applied"] and [a["examples"] for a in rnd["accepted"]] == [4]
    assert len(rnd["excluded"]) == 1 and "claims 40 examples, above this round's cap of 10" in rnd["excluded"][0]["reason"]
