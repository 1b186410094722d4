"""What a hostile counterpart can take, measured (issue 14).

(a) Recovery attack on the model. The data owner fine-tunes the WHOLE emulator (every parameter, not
    only the adapter) on public text (WikiText-2 valid) for fixed token budgets. Reported per method
    at the same ``--keep``: the emulator's token perplexity on WikiText-2 test and its zero-shot
    accuracy on a task, before and after, against the original's, and the share of the gap closed:
    ``(log ppl_emu - log ppl_attacked) / (log ppl_emu - log ppl_original)`` and
    ``(acc_attacked - acc_emu) / (acc_original - acc_emu)`` (1 = the original recovered).
(b) Membership inference through the returned adapter. An adapter fine-tuned on the (uniform)
    emulator with N training rows of a task is plugged into the original; the plug-in model's loss
    on each of those rows and on N held-back rows of the same split gives an AUC of ``-loss`` as a
    membership score (0.5: nothing leaks). The original model's AUC on the same rows is the reference.

    OMP_NUM_THREADS=1 python bench/attack.py --keep 0.4 --budgets 1024,4096 --zs-limit 40 --mi-rows 64 --mi-epochs 1,4 \
        --out results/attack
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradot.artifacts import load_emulator, plug_in, save_adapter, save_emulator
from gradot.stats.calib import CalibrationSpec, calibration_batches
from gradot.finetune import FinetuneConfig, encode_pair, finetune_adapter, task_records
from gradot.evaluation.lmeval import evaluate
from gradot.modeling import load_model
from gradot.analysis.proxy import perplexity
from gradot.split import split_model
from gradot.evaluation.tasks import load_task, resolve_data_dir
from gradot.methods import DEFAULT_KEEP
from common import build_emulator, git_commit  # bench/ is on sys.path when a script runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters kept (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--methods", default="uniform,svd", help="uniform and/or svd (calibration-free)")
    p.add_argument("--budgets", default="1024,4096,16384", help="attack tokens, cumulative checkpoints")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4,
                   help="the attacker's learning rate for the whole emulator on public text (not the data owner's "
                        "adapter rate: membership inference trains the adapter at the library's TASK_LR)")
    p.add_argument("--ppl-sequences", type=int, default=4)
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--zs-task", default="piqa")
    p.add_argument("--zs-limit", type=int, default=100)
    p.add_argument("--mi-task", default="piqa")
    p.add_argument("--mi-rows", type=int, default=200, help="members, and as many held-back rows")
    p.add_argument("--mi-epochs", default="1,5")
    p.add_argument("--out", default="results/attack")
    return p.parse_args(argv)


def shipped(method: str, model, split, keep: float, folder: Path):
    """The emulator exactly as the data owner receives it (saved and re-loaded)."""
    emu = build_emulator(method, model, split, keep)  # uniform or svd: no calibration text
    save_emulator(emu, folder / method, overwrite=True)
    return load_emulator(folder / method)


def accuracy(model, tok, args) -> float:
    model.eval()
    return evaluate(model, tok, [args.zs_task], limit=args.zs_limit, batch_size=8)[args.zs_task]["acc"]


def gap_closed(before: float, after: float, target: float) -> float | None:
    return None if before == target else (before - after) / (before - target)


def recovery(method: str, model, tok, split, args, folder: Path, original: dict, ppl_batches, train) -> dict:
    emu = shipped(method, model, split, args.keep, folder).model
    rows = []

    budgets = sorted(int(b) for b in args.budgets.split(","))

    def record(tokens: int) -> None:
        emu.eval()
        with torch.no_grad():
            ppl = perplexity(emu, ppl_batches)
        # zero-shot accuracy (the costly part on a shared CPU) before the attack and after its largest budget
        acc = accuracy(emu, tok, args) if tokens in (0, budgets[-1]) or tokens >= budgets[-1] else None
        rows.append({"tokens": tokens, "perplexity": ppl, "acc": acc,
                     "ppl_gap_closed": gap_closed(math.log(rows[0]["perplexity"]) if rows else math.log(ppl),
                                                  math.log(ppl), math.log(original["perplexity"])),
                     "acc_gap_closed": None if acc is None else gap_closed(rows[0]["acc"] if rows else acc, acc,
                                                                           original["acc"])})
        print(f"{method}: {tokens} attack tokens: perplexity {ppl:.1f}, {args.zs_task} acc {acc}", flush=True)

    record(0)
    for p in emu.parameters():  # the whole emulator: embeddings, adapter, middle, head
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(emu.parameters(), lr=args.lr, weight_decay=0.0)
    tokens, step = 0, 0
    for budget in budgets:
        emu.train()
        while tokens < budget:
            batch = train[step % len(train)]
            loss = emu(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(emu.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch.numel()
            step += 1
        record(tokens)
    return {"method": method, "trainable_parameters": sum(p.numel() for p in emu.parameters()), "rows": rows}


def row_losses(model, tok, records) -> list[float]:
    """Mean loss per answer token of each (prompt, answer) row, as fine-tuning scores it."""
    model.eval()
    out = []
    with torch.no_grad():
        for prompt, answer in records:
            context, continuation = encode_pair(tok, prompt, answer)
            ids = torch.tensor([(context + continuation)[-256:]])
            labels = ids.clone()
            labels[:, : ids.shape[1] - len(continuation)] = -100
            out.append(float(model(input_ids=ids, labels=labels, use_cache=False).loss))
    return out


def auc(members: list[float], others: list[float]) -> float:
    """P(a member's loss < a held-back row's loss), ties counting half (Mann-Whitney)."""
    wins = sum((m < o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


def membership(model, tok, split, args, folder: Path) -> dict:
    rows = task_records(load_task(args.mi_task, "train", limit=2 * args.mi_rows))
    members, held_back = rows[: args.mi_rows], rows[args.mi_rows:]
    out = {"task": args.mi_task, "rows": args.mi_rows,
           "original_auc": auc(row_losses(model, tok, members), row_losses(model, tok, held_back)), "adapters": []}
    print(f"membership: original model AUC {out['original_auc']:.3f}", flush=True)
    for epochs in (float(e) for e in args.mi_epochs.split(",")):
        emu = shipped("uniform", model, split, args.keep, folder)
        cfg = FinetuneConfig(output_dir=str(folder / f"ckpt-{epochs}"), task=args.mi_task, epochs=epochs,
                             batch_size=8, max_length=256, save_total_limit=1, logging_steps=5)
        emu, stats = finetune_adapter(emu, tok, members, cfg)
        save_adapter(emu, folder / f"adapter-{epochs}", overwrite=True)
        plugged = plug_in(copy.deepcopy(model), folder / f"adapter-{epochs}", max_change=0)  # its own adapter
        m, h = row_losses(plugged, tok, members), row_losses(plugged, tok, held_back)
        entry = {"epochs": epochs, "steps": stats["steps"], "train_loss": stats["train_loss"], "auc": auc(m, h),
                 "member_loss": sum(m) / len(m), "held_back_loss": sum(h) / len(h)}
        out["adapters"].append(entry)
        print(f"membership: adapter after {epochs:g} epochs: AUC {entry['auc']:.3f} "
              f"(loss {entry['member_loss']:.3f} members, {entry['held_back_loss']:.3f} held back)", flush=True)
    return out


def markdown(info: dict) -> str:
    a = info["settings"]
    lines = [f"Command: `{info['command']}`  ", f"Commit {info['commit']}; {info['date']}; {info['machine']}; "
             f"{info['minutes']:.1f} min", "",
             f"Original: WikiText-2 test token perplexity **{info['original']['perplexity']:.2f}**, "
             f"{a['zs_task']} accuracy **{info['original']['acc']:.3f}** (first {a['zs_limit']} validation questions).",
             "", "### Recovery attack: the whole emulator fine-tuned on public text (WikiText-2 valid)", "",
             "| method | attack tokens | perplexity | ppl gap closed | acc | acc gap closed |", "|---|---|---|---|---|---|"]
    fmt = lambda x, spec=".2f": "n/a" if x is None else format(x + 0.0, spec)  # noqa: E731 (+0.0: no "-0.00")
    for r in info["recovery"]:
        for row in r["rows"]:
            lines.append(f"| {r['method']} | {row['tokens']:,} | {row['perplexity']:.1f} | {fmt(row['ppl_gap_closed'])} "
                         f"| {fmt(row['acc'], '.3f')} | {fmt(row['acc_gap_closed'])} |")
    m = info["membership"]
    lines += ["", f"### Membership inference through the adapter ({m['task']}, {m['rows']} members, "
              f"{m['rows']} held back)", "", "| model | AUC | member loss | held-back loss |", "|---|---|---|---|",
              f"| original (reference) | {m['original_auc']:.3f} | | |"]
    for e in m["adapters"]:
        lines.append(f"| plug-in, adapter after {e['epochs']:g} epoch(s) ({e['steps']} steps) | {e['auc']:.3f} | "
                     f"{e['member_loss']:.3f} | {e['held_back_loss']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    split = split_model(model, 2)
    text = resolve_data_dir() / "text" / "wikitext-2-raw"
    ppl_batches = calibration_batches(tok, CalibrationSpec(str(text / "wiki.test.raw"), args.ppl_sequences,
                                                           args.ppl_len, 2))
    needed = -(-max(int(b) for b in args.budgets.split(",")) // (args.seq_len * args.batch))
    train = calibration_batches(tok, CalibrationSpec(str(text / "wiki.valid.raw"), needed * args.batch,
                                                     args.seq_len, args.batch))
    with torch.no_grad():
        original = {"perplexity": perplexity(model, ppl_batches)}
    original["acc"] = accuracy(model, tok, args)
    print(f"original: perplexity {original['perplexity']:.2f}, {args.zs_task} acc {original['acc']:.3f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradot-attack-") as tmp:
        results = [recovery(m, model, tok, split, args, Path(tmp), original, ppl_batches, train)
                   for m in args.methods.split(",")]
        mi = membership(model, tok, split, args, Path(tmp))
    info = {"command": "OMP_NUM_THREADS=1 python bench/attack.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                       f"torch {torch.__version__}",
            "minutes": (time.time() - t0) / 60, "settings": vars(args), "original": original,
            "recovery": results, "membership": mi}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps(info, indent=1))
    (out / "attack.md").write_text(markdown(info))
    print(markdown(info))


if __name__ == "__main__":
    main()
