"""Proxy benchmark: every emulator method at the same budget on one model, without fine-tuning.

For each (method, keep) cell: (a) cosine between the adapter's gradient on the emulator and on the
original model, on the same batches of task data (paired), mean and standard error; the paired
difference to OT† uniform drop with its standard error; (b) token perplexity on the first tokens of
WikiText-2 test (not the harness's word perplexity); (c) the
achieved middle-block size; (d) compression wall time next to one forward-backward pass over the
same calibration set (the floor). Every finished cell is cached under ``OUT/cells`` so an
interrupted run resumes.

    python bench/proxy.py --out results/proxy            # the default model, keeps 0.4 and 0.7
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path
from gradot.methods import get
from gradot.methods.gradot import middle_linears
from gradot.stats.kfac import collect_kfac, forward_backward_floor
from gradot.modeling import load_model
from gradot.analysis.proxy import adapter_gradients, cosines, encode_pairs, mean_and_stderr, perplexity
from gradot.split import split_model
from gradot.evaluation.tasks import load_task, resolve_data_dir
from common import build_emulator, git_commit, method_variant  # bench/ is on sys.path when a script runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="results/proxy")
    p.add_argument("--keeps", default="0.4,0.7")
    p.add_argument("--lambdas", default="0,0.001,0.003,0.01,0.03,0.1,0.3,1",
                   help="lambda sweep (attention and MLP together) for the sweep allocation")
    p.add_argument("--sweep-allocation", default="global", help="allocation the lambda sweep runs on")
    p.add_argument("--methods", default="uniform,crash,svd,wanda,gradot-uniform,gradot-global,gradot-global-layers")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--tasks", default="piqa,arc_easy,sciq,openbookqa")
    p.add_argument("--grad-batches", type=int, default=12, help="paired batches of task data")
    p.add_argument("--grad-batch-size", type=int, default=8)
    p.add_argument("--ppl-sequences", type=int, default=8)
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true",
                   help="no computation: rebuild the table and JSON from the cached cells (missing cells are listed)")
    return p.parse_args(argv)


def task_batches(tok, tasks, n_batches, batch_size, seed):
    rng = random.Random(seed)
    pools = {t: load_task(t, "train") for t in tasks}
    batches = []
    for b in range(n_batches):
        task = tasks[b % len(tasks)]
        rows = rng.sample(pools[task], batch_size)
        batches.append(encode_pairs(tok, [(r.prompt, r.continuation()) for r in rows], max_length=256))
    return batches


def cell_list(args):
    cells = []
    for keep in [float(k) for k in args.keeps.split(",")]:
        for method in args.methods.split(","):
            cells.append((method, keep, 0.0))
        for lam in [float(x) for x in args.lambdas.split(",")]:
            if lam > 0:
                cells.append((f"gradot-{args.sweep_allocation}", keep, lam))
    return cells


def cell_path(out, method, keep, lam):
    return out / "cells" / f"{method}_keep{keep}_lam{lam}.json"


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = cell_list(args)
    if not args.report_only:
        compute(args, out, cells)
    meta = json.loads((out / "cells" / "_original.json").read_text())
    rows, missing = [], []
    for method, keep, lam in cells:
        path = cell_path(out, method, keep, lam)
        if path.exists():
            rows.append(json.loads(path.read_text()))
        else:
            missing.append(path.stem)
    report(args, out, meta, rows, missing)


def compute(args, out, cells):
    torch.manual_seed(args.seed)
    model, tok = load_model(args.model)
    split = split_model(model, 2)
    tasks = args.tasks.split(",")
    calib = calibration_batches(tok, CalibrationSpec(str(default_calibration_path()), args.calib_sequences,
                                                     args.calib_len, args.calib_batch))
    test_text = resolve_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"
    ppl_batches = calibration_batches(tok, CalibrationSpec(str(test_text), args.ppl_sequences, args.ppl_len, 4))
    grad_batches = task_batches(tok, tasks, args.grad_batches, args.grad_batch_size, args.seed)

    reference = adapter_gradients(model, split.adapter, grad_batches, desc="original adapter gradients")
    meta_path = out / "cells" / "_original.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        meta = {"perplexity": perplexity(model, ppl_batches)}
        meta["floor_seconds"] = forward_backward_floor(model, calib)
        meta_path.write_text(json.dumps(meta))
    print(f"original: perplexity {meta['perplexity']:.2f}; forward-backward floor {meta['floor_seconds']:.1f} s", flush=True)

    factors, kfac_seconds = None, None

    def get_factors():
        nonlocal factors, kfac_seconds
        if factors is None:
            t0 = time.perf_counter()
            factors = collect_kfac(model, middle_linears(model, split), calib)
            kfac_seconds = time.perf_counter() - t0
            meta["kfac_seconds"] = kfac_seconds
            meta_path.write_text(json.dumps(meta))
            print(f"KFAC statistics: {kfac_seconds:.1f} s", flush=True)
        return factors

    for method, keep, lam in cells:
        key = f"{method}_keep{keep}_lam{lam}"
        path = cell_path(out, method, keep, lam)
        if path.exists():
            row = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            extra = 0.0
            name = method_variant(method)[0]
            if hasattr(get(name).config, "engine") and get(name).needs_calibration:
                get_factors()  # collected once (timed apart), counted for every GradOT-family cell
                t0 = time.perf_counter()
                extra = kfac_seconds
            emu = build_emulator(method, model, split, keep, batches=calib, factors=get_factors,
                                 options={"lambda_attn": lam, "lambda_mlp": lam})
            seconds = time.perf_counter() - t0 + extra
            grads = adapter_gradients(emu.model, emu.adapter_positions, grad_batches, desc=f"{key} gradients")
            cos = cosines(reference, grads)
            size = emu.manifest["size"]
            row = {
                "method": method, "keep": keep, "lambda": lam, "cosines": cos,
                "keep_achieved": size["keep_achieved"], "middle_params_kept": size["middle_params_kept"],
                "emulator_params": size["emulator_params"], "depth": size["emulator_depth"],
                "perplexity": perplexity(emu.model, ppl_batches), "compress_seconds": seconds,
                "dropped_layers": emu.manifest["settings"].get("dropped_layers", []),
            }
            path.write_text(json.dumps(row))
            del emu
        m, se = mean_and_stderr(row["cosines"])
        print(f"{key:40s} cos {m:.3f} ± {se:.3f}  ppl {row['perplexity']:10.1f}  keep {row['keep_achieved']:.3f}  "
              f"{row['compress_seconds']:.1f} s", flush=True)


def report(args, out, meta, rows, missing):
    tasks = args.tasks.split(",")
    uniform_cos = {r["keep"]: r["cosines"] for r in rows if r["method"] == "uniform"}
    for row in rows:
        m, se = mean_and_stderr(row["cosines"])
        row["cos_mean"], row["cos_stderr"] = m, se
        base = uniform_cos.get(row["keep"])
        if base:
            d, dse = mean_and_stderr([a - b for a, b in zip(row["cosines"], base)])
            row["diff_vs_uniform"], row["diff_vs_uniform_stderr"] = d, dse
        row["compress_x_floor"] = row["compress_seconds"] / meta["floor_seconds"]

    command = "python bench/proxy.py " + " ".join(sys.argv[1:])
    info = {
        "command": command, "git_commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
        "model": args.model, "settings": vars(args), "original": meta, "rows": rows, "missing_cells": missing,
    }
    (out / "proxy.json").write_text(json.dumps(info, indent=2))
    lines = [
        f"# Proxy benchmark ({args.model})", "",
        f"Command: `{command}`  ", f"Commit: {info['git_commit']}; date {info['date']}; machine: {info['machine']}  ",
        f"Original model: WikiText-2 test token perplexity {meta['perplexity']:.2f} (first {args.ppl_sequences}×{args.ppl_len} tokens); "
        f"forward-backward floor over the calibration set ({args.calib_sequences}×{args.calib_len} tokens): "
        f"{meta['floor_seconds']:.1f} s.  ",
        f"Adapter-gradient cosine: {args.grad_batches} paired batches of {args.grad_batch_size} training rows "
        f"from {', '.join(tasks)}; Δ vs OT† is the paired difference to uniform layer drop at the same keep.",
        f"Cells not computed: {', '.join(missing) if missing else 'none'}.", "",
        "| method | keep | λ | achieved keep | depth | grad cosine | Δ vs OT† | perplexity | compress s | × floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['diff_vs_uniform']:+.3f} ± {r['diff_vs_uniform_stderr']:.3f}" if "diff_vs_uniform" in r else "–"
        lines.append(
            f"| {r['method']} | {r['keep']} | {r['lambda']} | {r['keep_achieved']:.3f} | {r['depth']} | "
            f"{r['cos_mean']:.3f} ± {r['cos_stderr']:.3f} | {diff} | {r['perplexity']:.1f} | {r['compress_seconds']:.1f} | "
            f"{r['compress_x_floor']:.2f} |")
    (out / "proxy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
