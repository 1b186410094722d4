"""Time the KFAC Gram products (``A = Σ x xᵀ``, ``G = Σ g gᵀ``) in float32 and from bfloat16 copies,
at the default model's widths, as ratios within one run, and the relative error of the bfloat16 sum.

    OMP_NUM_THREADS=1 python bench/kfac_products.py --out results/kfac-products

One calibration batch of the CLI's default (4 × 256 = 1024 tokens) per product; the widths are
SmolLM2-135M's (576: attention and MLP inputs, q/o outputs; 1536: MLP intermediate, the input of
down_proj and the outputs of gate/up). Round robin over ``--repeats``; medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import git_commit, machine  # bench/ is on sys.path when a script runs
from gradot.stats.kfac import _accumulate_gram, _symmetrize_


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="576,1536")
    p.add_argument("--rows", type=int, default=1024, help="tokens per batch")
    p.add_argument("--batches", type=int, default=8, help="batches summed per timed run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/kfac-products")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for n in [int(w) for w in args.widths.split(",")]:
        # activations with a few large directions, like a transformer's residual stream
        data = [torch.randn(args.rows, n) * (1 + 4 * torch.rand(n)) for _ in range(args.batches)]
        runs = {torch.float32: [], torch.bfloat16: []}
        sums = {}
        for _ in range(args.repeats):
            for dtype in runs:
                acc = [None]

                def run():
                    for x in data:
                        acc[0] = _accumulate_gram(acc[0], x, dtype)
                runs[dtype].append(timed(run))
                sums[dtype] = _symmetrize_(acc[0])
        exact = sum(x.double().T @ x.double() for x in data)
        err = {str(d).split(".")[-1]: float((sums[d].double() - exact).norm() / exact.norm()) for d in sums}
        f32, b16 = statistics.median(runs[torch.float32]), statistics.median(runs[torch.bfloat16])
        rows.append({"width": n, "float32_s": f32, "bfloat16_s": b16, "ratio": b16 / f32, "rel_error": err})
    command = "python bench/kfac_products.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"command": command, "git_commit": git_commit(), "machine": machine(torch.device("cpu")),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "settings": vars(args), "rows": rows}
    lines = ["# KFAC Gram products: float32 against bfloat16 copies", "", f"Command: `{command}`  ",
             f"Commit {info['git_commit']}; {info['date']}; {info['machine']}  ",
             f"{args.batches} batches of {args.rows} tokens summed per run; median of {args.repeats} round-robin runs; "
             f"{args.threads} thread(s).", "",
             "| width | float32 s | bfloat16 s | ratio | rel. error float32 | rel. error bfloat16 |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['float32_s']:.3f} | {r['bfloat16_s']:.3f} | **{r['ratio']:.2f}** | "
                     f"{r['rel_error']['float32']:.1e} | {r['rel_error']['bfloat16']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kfac_products.json").write_text(json.dumps(info, indent=1))
    (out / "kfac_products.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
