"""The healing matrix of issue 26, cell by cell, resumable across machines' restarts: builds each
missing emulator with ``gradot compress`` and heals it with ``bench/heal.py`` (which resumes from its
checkpoint and skips measured budgets). Several lanes share the matrix (``--lane i/n``: entry j
goes to lane j mod n), one process per core.

    nohup env OMP_NUM_THREADS=1 python bench/heal_matrix.py --lane 0/2 --upto 32768 > heal-lane0.log &
    nohup env OMP_NUM_THREADS=1 python bench/heal_matrix.py --lane 1/2 --upto 32768 > heal-lane1.log &
    (then --upto 262144, then without --upto: each entry resumes from its checkpoint)
    python bench/heal.py --report-only --out results/heal          # the table from the cells so far
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from gradot.analysis.healing import HealConfig

FULL = "0,32768,262144,1048576"  # the key emulators and the reference go to 1 M tokens
SHORT = "0,32768,262144"
CALIB2 = "bench/inputs/calib-wikitext-valid-from-token-8192.raw"  # a second calibration sample (bench/make_calib.py)

# label: (compress arguments, or None for the random-middle reference; budgets), in priority order
MATRIX = {
    "original": ([], ""),
    "gradot-0.7": (["--method", "gradot", "--keep", "0.7"], FULL),
    "uniform-0.85": (["--method", "uniform", "--keep", "0.85"], FULL),
    "reference": (None, FULL),
    "gradot-0.55": (["--method", "gradot", "--keep", "0.55"], FULL),
    "uniform-0.7": (["--method", "uniform", "--keep", "0.7"], SHORT),
    "gradot-0.7-calib2": (["--method", "gradot", "--keep", "0.7", "--calib", CALIB2], SHORT),
    "gradot-0.55-calib2": (["--method", "gradot", "--keep", "0.55", "--calib", CALIB2], SHORT),
    "crash-0.7": (["--method", "crash", "--keep", "0.7"], SHORT),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lane", default="0/1", help="i/n: this process runs entries i, i+n, ...")
    p.add_argument("--only", help="comma-separated labels (default: the whole matrix)")
    p.add_argument("--upto", type=int, help="heal every entry only up to this budget first (a later run with a "
                                         "larger one resumes each from its checkpoint)")
    p.add_argument("--lr", type=float, default=HealConfig.lr)
    p.add_argument("--emulators", default=os.path.expanduser("~/.cache/gradot/heal-emulators"))
    p.add_argument("--out", default="results/heal")
    return p.parse_args(argv)


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    lane, lanes = (int(x) for x in args.lane.split("/"))
    labels = args.only.split(",") if args.only else list(MATRIX)
    python = sys.executable
    for j, label in enumerate(labels):
        if j % lanes != lane:
            continue
        compress, budgets = MATRIX[label]
        if args.upto is not None and budgets:
            budgets = ",".join(b for b in budgets.split(",") if int(b) <= args.upto)
        if label == "original":
            if not (Path(args.out) / "cells" / "original.json").is_file():
                run([python, "bench/heal.py", "--label", "original", "--out", args.out])
            continue
        source = ["--reference"]
        if compress is not None:
            emulator = Path(args.emulators) / label
            if not (emulator / "manifest.json").is_file():
                run(["gradot", "compress", *compress, "--out", str(emulator), "--overwrite"])
            source = ["--emulator", str(emulator)]
        # zero-shot (the costly measurement) at every budget of the key rows, at the ends of the others
        tasks_at = [] if MATRIX[label][1] == FULL else ["--tasks-at", f"0,{MATRIX[label][1].split(',')[-1]}"]
        run([python, "bench/heal.py", "--label", label, *source, "--budgets", budgets, "--lr", f"{args.lr:g}",
             *tasks_at, "--out", args.out])


if __name__ == "__main__":
    main()
