"""One hostile data owner among three: what each attack does to the federated adapter, per
aggregation rule (gradot.federated; docs/federated.md, "What one client can and cannot do").

A tiny random Llama (4 layers, k = 1) on a synthetic task whose answer is a fixed word and the question's
last word, so that the adapter learns something measurable in a few steps; three data owners
(12 + 12 + 12 rows), 3 rounds of 4 local steps. For every aggregation rule (and FedAvg with every
defence off, "fedavg, undefended": no count cap, no clipping) it runs the honest federation and
each attack by the third client: an inflated example count (10^9), its update scaled x100, one
value of its update set to 1e30, NaN under SecAgg+ (FedAvg only: SecAgg+ needs it), and a client
that hangs past the round timeout. Reported: rounds applied, the final adapter's distance from
the honest federation's (same rule), relative to how far the honest federation moved it, and the
plugged full model's answer-token accuracy on 64 held-out rows (and whether its logits are finite).

The clipping bound is set the way the default was chosen for the default model: 5x the largest
honest update norm of a first honest run, relative to the global adapter's norm.

    OMP_NUM_THREADS=1 python bench/federated_attack.py --out results/federated-attack
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import git_commit, machine, table_row, write_markdown

VOCAB = 128
WORDS = [f"w{i}" for i in range(40)]
RULES = ("fedavg, undefended", "fedavg", "median", "trimmed-mean", "krum")
ATTACKS = ("honest", "inflated count", "scaled x100", "one value 1e30", "NaN under SecAgg+", "hanging client")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]", "Question", ":", "Answer"] + WORDS
    words += [f"x{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def tiny_model():
    from transformers import LlamaConfig

    from gradot.modeling import random_model

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return random_model(cfg, seed=0)


def records(n: int, seed: int):
    """``Question : a b c Answer : w7 c`` (the answer: a fixed word, then the question's last)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        q = list(rng.choice(WORDS, 3))
        out.append((f"Question : {' '.join(q)} Answer :", f" w7 {q[2]}"))
    return out


def answer_accuracy(model, tok, rows) -> tuple[float, float, bool]:
    """Answer-token accuracy (argmax) and mean cross-entropy of ``model`` on ``rows``; whether every
    logit was finite."""
    hits = total = 0
    loss = 0.0
    finite = True
    model.eval()
    with torch.no_grad():
        for prompt, answer in rows:
            p = tok(prompt)["input_ids"]
            a = tok(answer)["input_ids"]
            ids = torch.tensor([p + a])
            logits = model(ids).logits[0]
            finite &= bool(torch.isfinite(logits).all())
            at = logits[len(p) - 1:len(p) + len(a) - 1]
            hits += int((at.argmax(-1) == torch.tensor(a)).sum())
            loss += float(torch.nn.functional.cross_entropy(at.double(), torch.tensor(a), reduction="sum"))
            total += len(a)
    return hits / total, loss / total, finite


def tamper_for(attack: str, timeout: float):
    if attack == "scaled x100":
        return lambda d: [x * 100 for x in d]
    if attack in ("one value 1e30", "NaN under SecAgg+"):
        value = 1e30 if attack == "one value 1e30" else np.nan

        def one(d):
            d[0] = d[0].copy()
            d[0].flat[0] = value
            return d

        return one
    if attack == "hanging client":
        return lambda d: (time.sleep(timeout * 2), d)[1]
    return None


def run_cell(rule: str, attack: str, clip: float, data, out: Path, emulator_fn, tok, args):
    from gradot.federated.apps import AdapterClient, FederationSettings, make_client_app, make_server_app
    from gradot.federated.runtime import run_local

    undefended = rule == "fedavg, undefended"
    settings = FederationSettings(
        rounds=args.rounds, local_steps=args.local_steps, lr=args.lr, batch_size=4, max_length=32, min_clients=2,
        min_available=3, round_timeout=args.timeout, seed=0, aggregate="fedavg" if undefended else rule,
        clip=0.0 if undefended else clip, max_examples_ratio=0.0 if undefended else 4.0,
        max_examples=0 if undefended else max(len(d) for d in data),
        secagg=attack == "NaN under SecAgg+", secagg_clip=1.0, secagg_max_weight=float(max(len(d) for d in data)))

    class Hostile(AdapterClient):
        def fit(self, parameters, config):
            delta, n, metrics = super().fit(parameters, config)
            return delta, (10**9 if attack == "inflated count" else n), metrics

    clients = [AdapterClient(emulator_fn(), tok, data[0]), AdapterClient(emulator_fn(), tok, data[1]),
               Hostile(emulator_fn(), tok, data[2], tamper=tamper_for(attack, args.timeout))]
    server_emu = emulator_fn()
    results = []
    server = make_server_app(lambda config: (server_emu, settings, out, None), results)
    client = make_client_app(lambda context: clients[int(context.node_config["partition-id"])])
    t0 = time.perf_counter()
    run_local(server, client, 3)
    return results[0], time.perf_counter() - t0


def adapter_arrays(folder: Path):
    from safetensors.numpy import load_file

    from gradot.artifacts import ADAPTER_FILE

    t = load_file(str(folder / "adapter" / ADAPTER_FILE))
    return [t[k].astype(np.float64) for k in sorted(t)]


def distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/federated-attack")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--timeout", type=float, default=3.0, help="round timeout (s); the hanging client sleeps 2x")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    for name in ("gradot", "flwr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    from gradot.artifacts import plug_in
    from gradot.methods.uniform import uniform_emulator
    from gradot.split import split_model

    tok = tiny_tokenizer()
    full = tiny_model()
    k = 1
    base_emu = uniform_emulator(full, split_model(full, k), 0.5)

    def emulator_fn():
        return copy.deepcopy(base_emu)

    data = [records(12, 1), records(12, 2), records(12, 3)]
    held_out = records(64, 99)
    base_acc, base_loss, _ = answer_accuracy(full, tok, held_out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fed-attack-") as tmp:
        tmp = Path(tmp)
        # The clipping bound: 5x the largest honest update of a first honest run, as for the default model.
        probe, _ = run_cell("fedavg", "honest", 0.0, data, tmp / "probe", emulator_fn, tok, args)
        honest_change = max(a["change"] for r in probe["rounds"] for a in r["accepted"])
        clip = 5 * honest_change
        print(f"largest honest update: {honest_change:.4f} of the adapter's norm; clip = {clip:.4f}", file=sys.stderr)
        start = [np.asarray(a, np.float64) for a in _initial(base_emu)]
        cells, honest = [], {}
        for rule in RULES:
            for attack in ATTACKS:
                if attack == "NaN under SecAgg+" and not rule.startswith("fedavg"):
                    continue  # SecAgg+ is FedAvg only
                folder = tmp / f"{rule}-{attack}".replace(" ", "_").replace(",", "")
                record, seconds = run_cell(rule, attack, clip, data, folder, emulator_fn, tok, args)
                arrays = adapter_arrays(folder)
                model = copy.deepcopy(full)
                try:
                    plug_in(model, folder / "adapter", k=k)
                    acc, loss, finite = answer_accuracy(model, tok, held_out)
                except Exception as exc:  # an adapter plug_in refuses: recorded, not plugged
                    acc, loss, finite = float("nan"), float("nan"), f"refused: {exc}"
                if attack == "honest":
                    honest[rule] = arrays
                ref = honest[rule]
                cell = {"rule": rule, "attack": attack, "rounds_applied": record["rounds_applied"],
                        "distance_from_honest": distance(arrays, ref) / max(distance(ref, start), 1e-12),
                        "accuracy": acc, "answer_loss": loss, "finite_logits": finite, "seconds": round(seconds, 2),
                        "excluded": sum(len(r["excluded"]) for r in record["rounds"]),
                        "clipped": sum(bool(a.get("clipped")) for r in record["rounds"] for a in r["accepted"]),
                        "failures": sum(len(r["failures"]) for r in record["rounds"]),
                        "notes": sorted({r["note"].split(":")[0] for r in record["rounds"] if r.get("note")})}
                cells.append(cell)
                print(json.dumps(cell), file=sys.stderr)
    meta = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "commit": git_commit(),
            "machine": machine(threads=1), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": {"rounds": args.rounds, "local_steps": args.local_steps, "lr": args.lr, "clients": [12, 12, 12],
                         "round_timeout": args.timeout, "clip": clip, "largest_honest_change": honest_change,
                         "max_examples": 12, "max_examples_ratio": 4.0, "held_out": len(held_out)},
            "no_adapter_accuracy": base_acc, "no_adapter_loss": base_loss, "seconds": round(time.perf_counter() - t_all, 1)}
    (out / "results.json").write_text(json.dumps({**meta, "cells": cells}, indent=1))
    lines = ["# One hostile data owner among three: attacks per aggregation rule", "",
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}; {meta['seconds']} s in all.", "",
             "A tiny random Llama (4 layers, k = 1, uniform emulator at keep 0.5), a synthetic task (answer: "
             "a fixed word, then the question's last word), three data owners of 12 rows, "
             f"{args.rounds} rounds of {args.local_steps} local steps at lr {args.lr:g}. The third client attacks. "
             f"Clipping bound {clip:.3f} x the global adapter's norm (5x the largest honest update, {honest_change:.3f}); "
             "count cap: the largest share (12) and 4x the round's median; round timeout "
             f"{args.timeout:g} s. \"distance\": the final adapter's distance from the honest federation's under the "
             "same rule, over the honest federation's own movement (0: unharmed). \"accuracy\": the plugged full "
             f"model's answer-token accuracy and mean cross-entropy (\"loss\", nats) on {len(held_out)} held-out rows "
             f"(no adapter: {base_acc:.3f}, loss {base_loss:.2f}). \"hanging client\" is in effect the federation "
             "without the third client after round 1: its distance is what losing one honest client costs.", "",
             table_row(["rule", "attack", "rounds applied", "distance", "accuracy", "loss", "finite logits",
                        "left out", "clipped", "failed", "notes"]),
             table_row(["---"] * 11)]
    for c in cells:
        lines.append(table_row([c["rule"], c["attack"], f"{c['rounds_applied']}/{args.rounds}",
                                f"{c['distance_from_honest']:.3g}", f"{c['accuracy']:.3f}", f"{c['answer_loss']:.3g}",
                                c["finite_logits"],
                                c["excluded"], c["clipped"], c["failures"], "; ".join(c["notes"]) or "–"]))
    write_markdown(out / "README.md", lines)
    return 0


def _initial(emulator):
    from gradot.federated.core import AdapterSpec, to_arrays

    return to_arrays(emulator, AdapterSpec.of(emulator))


if __name__ == "__main__":
    sys.exit(main())
