"""λ-sweep benchmark: what ``--auto-lambda`` spends building one emulator per λ, scoring every λ
afresh (as before) against scoring once and re-weighting per λ (``methods.gradot.rescore``).

Same model, KFAC factors and grid for both, run round robin ``--repeats`` times; the adapter-gradient
evaluation that auto-λ adds per λ is timed once beside them (it does not depend on the scoring).
Both sweeps must give the same emulators (same slots per λ), which the script checks.

    python bench/auto_lambda.py --keep 0.4 --out results/auto-lambda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from compress import calibration, git_commit, machine  # bench/compress.py (same folder)

from gradot.methods.gradot.auto_lambda import DEFAULT_GRID
from gradot.methods.gradot import GradOTConfig, gradot_emulator, middle_linears, rescore, score_middle
from gradot.stats.kfac import collect_kfac
from gradot.modeling import load_model
from gradot.analysis.proxy import adapter_gradients
from gradot.split import split_model
from gradot.methods import DEFAULT_KEEP


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters kept (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--allocation", default="global")
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/auto-lambda")
    return p.parse_args(argv)


def sweep_scoring_each(model, split, factors, cfg, grid):
    return [gradot_emulator(model, split, replace(cfg, lambda_attn=lam, lambda_mlp=lam), factors) for lam in grid]


def sweep_rescoring(model, split, factors, cfg, grid):
    scores = score_middle(model, split, factors, replace(cfg, lambda_attn=0.0, lambda_mlp=0.0))
    out = []
    for lam in grid:
        at = replace(cfg, lambda_attn=lam, lambda_mlp=lam)
        out.append(gradot_emulator(model, split, at, None, scores=rescore(scores, at)))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("default")
    split = split_model(model, 2)
    batches = calibration(tok, model.config.vocab_size, args, torch.device("cpu"))
    factors = collect_kfac(model, middle_linears(model, split), batches, progress=False, gradients=True)
    cfg = GradOTConfig(keep=args.keep, allocation=args.allocation)
    grid = (0.0, *sorted(DEFAULT_GRID))

    runs = {"score every λ (before)": sweep_scoring_each, "score once, re-weight (after)": sweep_rescoring}
    times = {name: [] for name in runs}
    slots = {}
    for _ in range(args.repeats):
        for name, sweep in runs.items():
            t0 = time.perf_counter()
            emulators = sweep(model, split, factors, cfg, grid)
            times[name].append(time.perf_counter() - t0)
            slots[name] = [e.manifest["slots"] for e in emulators]
            del emulators
    same = slots["score every λ (before)"] == slots["score once, re-weight (after)"]
    if not same:
        raise SystemExit("the two sweeps built different emulators")

    held_out = [{"input_ids": b, "labels": b} for b in batches[-max(1, len(batches) // 4):]]
    emu = gradot_emulator(model, split, cfg, factors)
    t0 = time.perf_counter()
    adapter_gradients(emu.model, emu.adapter_positions, held_out, desc="adapter gradients")
    per_lambda_gradients = time.perf_counter() - t0

    rows = [(name, statistics.median(ts), ts) for name, ts in times.items()]
    before = rows[0][1]
    lines = [
        f"λ grid {list(grid)}, keep {args.keep}, allocation {args.allocation}, default model, "
        f"{args.calib_sequences} × {args.calib_len} calibration tokens; median of {args.repeats} runs (round robin)",
        "",
        "| sweep | seconds for the grid (median) | runs | × before |",
        "|---|---|---|---|",
        *[f"| {n} | {m:.1f} | {', '.join(f'{t:.1f}' for t in ts)} | {m / before:.2f} |" for n, m, ts in rows],
        "",
        f"Adapter gradients on the held-out batches, once per λ in auto-λ: {per_lambda_gradients:.1f} s "
        f"(× {len(grid)} λ = {per_lambda_gradients * len(grid):.1f} s). Same emulators from both sweeps: {same}.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "command": "python bench/auto_lambda.py " + " ".join(argv or __import__("sys").argv[1:]),
        "git_commit": git_commit(), "machine": machine(torch.device("cpu")),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args), "grid": list(grid),
        "seconds": times, "adapter_gradients_seconds": per_lambda_gradients, "same_emulators": same,
    }
    (out / "auto_lambda.json").write_text(json.dumps(info, indent=1))
    (out / "auto_lambda.md").write_text(f"# λ sweep: scoring per λ vs re-weighting\n\n`{info['command']}`, "
                                        f"commit {info['git_commit']}, {info['machine']}, {info['date']}\n\n"
                                        + table + "\n")


if __name__ == "__main__":
    main()
