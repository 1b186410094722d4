"""Does computing the KFAC products in bfloat16, or over a random share of the tokens, change
GradOT's plan more than a different calibration sample does?

Reference: float32 products over the CLI's default calibration (32 × 256 tokens of WikiText-2
valid, batches of 4). Compared with it: bfloat16 products over the same tokens, products over half
(and a quarter) of the same tokens (`collect_kfac(token_fraction=...)`), both levers together, and
float32 products over the next 32 × 256 tokens (a different sample of the same size: the noise the
plan already has).
For keep 0.4 and 0.7 (global allocation, λ = 0), the share of the reference plan's kept attention
components and MLP channels that each variant keeps too.

    OMP_NUM_THREADS=1 python bench/kfac_plan.py --out results/kfac-products
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import git_commit, machine  # bench/ is on sys.path when a script runs
from gradot.emulator import middle_parameter_count
from gradot.methods.gradot.allocate import allocate_global
from gradot.methods.gradot.config import GradOTConfig
from gradot.methods.gradot.units import middle_linears, score_middle
from gradot.modeling import load_model
from gradot.split import split_model
from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path
from gradot.stats.kfac import collect_kfac

KEEPS = (0.4, 0.7)


def kept_units(scores, plan):
    """(attention components kept per matrix, MLP channels kept per layer) of a plan."""
    attn, mlp = {}, {}
    for ls in scores:
        if ls.index in plan.dropped:
            continue
        for m in ls.attn:
            rank = plan.ranks[ls.index].get(m.name)
            attn[(ls.index, m.name)] = set(m.keep_order[: len(m.keep_order) if rank is None else rank].tolist())
        mlp[ls.index] = set(ls.mlp.keep_order[: plan.channels[ls.index]].tolist())
    return attn, mlp


def agreement(ref: dict, other: dict) -> float:
    return sum(len(v & other.get(k, set())) for k, v in ref.items()) / max(1, sum(len(v) for v in ref.values()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/kfac-products")
    args = p.parse_args(argv)
    model, tok = load_model("default")
    model.eval()
    split = split_model(model, 2)
    chunks = calibration_batches(tok, CalibrationSpec(str(default_calibration_path()), 64, 256, 4))
    modules = middle_linears(model, split)
    target = {keep: round(keep * middle_parameter_count(model, split)) for keep in KEEPS}
    plans, rows = {}, {}
    variants = (("float32", chunks[:8], torch.float32, 1.0), ("bfloat16", chunks[:8], torch.bfloat16, 1.0),
                ("float32, half the tokens", chunks[:8], torch.float32, 0.5),
                ("float32, a quarter of the tokens", chunks[:8], torch.float32, 0.25),
                ("bfloat16, half the tokens", chunks[:8], torch.bfloat16, 0.5),
                ("float32, other sample", chunks[8:16], torch.float32, 1.0))
    for name, batches, products, fraction in variants:
        t0 = time.perf_counter()
        factors = collect_kfac(model, modules, batches, gradients=False, progress=False, products=products,
                               token_fraction=fraction)
        row = {"statistics_s": round(time.perf_counter() - t0, 1)}
        for keep in KEEPS:
            scores = score_middle(model, split, factors, GradOTConfig(keep=keep, allocation="global"))
            plans[name, keep] = kept_units(scores, allocate_global(scores, target[keep]))
            ref = plans["float32", keep]
            row[f"keep {keep}"] = {"attention": agreement(ref[0], plans[name, keep][0]),
                                   "mlp": agreement(ref[1], plans[name, keep][1])}
        rows[name] = row
        del factors
        print(name, row, flush=True)
    command = "python bench/kfac_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"command": command, "git_commit": git_commit(), "machine": machine(torch.device("cpu")),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(info, indent=1))
    lines = ["# GradOT's plan with bfloat16 KFAC products or a token sample", "", f"Command: `{command}`  ",
             f"Commit {info['git_commit']}; {info['date']}; {info['machine']}", "",
             "Share of the float32 plan's kept units that each variant keeps (global allocation, λ = 0).", "",
             "| products / sample | statistics s | keep 0.4 attention | keep 0.4 MLP | keep 0.7 attention | keep 0.7 MLP |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['statistics_s']} | " + " | ".join(
            f"{r[f'keep {k}'][part]:.4f}" for k in KEEPS for part in ("attention", "mlp")) + " |")
    (out / "plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
