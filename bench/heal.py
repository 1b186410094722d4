"""The healing matrix: every emulator healed on public text at log-spaced budgets, against the
original and the random-middle reference (``gradot.analysis.healing``, ``gradot.analysis.audit``).

One process heals one emulator (or the reference) and publishes its records as they come to
``OUT/cells/<label>.json``; checkpoints live under ``--state`` (outside the repository: they are
hundreds of MB) so a stopped run resumes where it was. ``--report-only`` gathers every cell into
``OUT/heal.md`` and ``OUT/heal.json``.

    OMP_NUM_THREADS=1 python bench/heal.py --label original --out results/heal         # the ceiling, measured once
    OMP_NUM_THREADS=1 python bench/heal.py --label gradot-0.7 --emulator EMU_DIR --out results/heal
    OMP_NUM_THREADS=1 python bench/heal.py --label reference --reference --out results/heal
    python bench/heal.py --report-only --out results/heal
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradot.analysis.audit import DEFAULT_TASKS, gaps, heal_copy, measurer, perplexity_sequences, random_middle_reference
from gradot.cells import write_json_atomic
from gradot.analysis.healing import HealConfig, attack_sequences, default_attack_files
from gradot.modeling import load_model
from gradot.split import split_model
from gradot.evaluation.tasks import resolve_data_dir
from common import git_commit, machine  # bench/ is on sys.path when a script runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", help="the cell's name: 'original' measures the original model")
    p.add_argument("--emulator", help="emulator folder to heal")
    p.add_argument("--reference", action="store_true", help="heal the random-middle reference")
    p.add_argument("--model", default="default")
    p.add_argument("--budgets", default="0,32768,262144,1048576")
    p.add_argument("--lr", type=float, default=HealConfig.lr)
    p.add_argument("--warmup", type=int, default=HealConfig.warmup_steps)
    p.add_argument("--train", default="all", choices=["all", "middle", "lora"])
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="zero-shot tasks, or 'none'")
    p.add_argument("--limit", type=int, default=500, help="questions per task")
    p.add_argument("--tasks-at", help="budgets (comma-separated) where the zero-shot tasks run (default: every "
                                      "budget); perplexity is measured at every budget")
    p.add_argument("--ppl-tokens", type=int, default=32_768, help="WikiText-2 test tokens for perplexity")
    p.add_argument("--state", default=os.path.expanduser("~/.cache/gradot/heal"), help="checkpoint folder root")
    p.add_argument("--out", default="results/heal")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def command(argv) -> str:
    return "OMP_NUM_THREADS=1 python bench/heal.py " + " ".join(argv if argv is not None else sys.argv[1:])


def run(args, argv) -> None:
    tasks = [] if args.tasks == "none" else args.tasks.split(",")
    config = HealConfig(budgets=tuple(int(b) for b in args.budgets.split(",")), lr=args.lr,
                        warmup_steps=args.warmup, train=args.train)
    cells = Path(args.out) / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    data = resolve_data_dir()
    measure = measurer(tok, perplexity_sequences(tok, data / "text" / "wikitext-2-raw" / "wiki.test.raw",
                                                 args.ppl_tokens), tasks, args.limit,
                       tasks_at=None if not args.tasks_at else [int(b) for b in args.tasks_at.split(",")])
    base = {"label": args.label, "command": command(argv), "commit": git_commit(), "machine": machine(),
            "settings": {"heal": {**vars(config), "budgets": list(config.budgets)}, "tasks": tasks,
                         "limit": args.limit, "ppl_tokens": args.ppl_tokens, "tasks_at": args.tasks_at,
                         "text": [f.name for f in default_attack_files(data)]}}
    if args.label == "original":
        t0 = time.time()
        write_json_atomic(cells / "original.json", {**base, "date": _now(), "original": measure(model, 0),
                                             "seconds": time.time() - t0})
        return
    split = split_model(model, 2)
    if args.reference:
        target, middle, what = random_middle_reference(model, split.middle), split.middle, {"reference": True}
    else:
        from gradot.artifacts import load_emulator

        emu = load_emulator(args.emulator)
        target = emu.model
        middle = [i for i, s in enumerate(emu.slots) if s.role == "middle"]
        what = {"method": emu.manifest["method"], "keep_requested": emu.manifest.get("keep_requested"),
                "keep_achieved": emu.manifest["size"]["keep_achieved"], "settings": emu.manifest.get("settings")}
    del model
    sequences = attack_sequences(tok, default_attack_files(data), config.budgets[-1], config.seq_len)

    def publish(records):
        write_json_atomic(cells / f"{args.label}.json", {**base, "date": _now(), "emulator": what, "records": records})

    heal_copy(target, middle, sequences, config, measure, Path(args.state) / args.label,
              identity={"label": args.label, "emulator": what}, progress=lambda m: print(f"{args.label}: {m}", flush=True),
              on_record=publish)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _provenance(cells: dict) -> str:
    """Which commits, dates and machines the cells come from (each cell holds its own command)."""
    seen = sorted({(c.get("commit", "?"), c.get("date", "?")[:10], c.get("machine", "?")) for c in cells.values()})
    return "Cells from: " + "; ".join(f"commit {c}, {d}, {m}" for c, d, m in seen) + "."


def _plain_report(out: Path, cells: dict) -> None:
    """A folder without the original (the learning-rate sweep): perplexity per cell and budget."""
    lines = ["# Healing cells", "", f"Each cell's command is in cells/*.json; this table: `python bench/heal.py "
             f"--report-only --out {out}`.", "", _provenance(cells), "",
             "| cell | lr | tokens | CPU-s | perplexity |", "|---|---|---|---|---|"]
    for label, cell in sorted(cells.items()):
        lr = cell["settings"]["heal"]["lr"]
        lines += [f"| {label} | {lr:g} | {r['tokens']:,} | {r['cpu_seconds']:.0f} | {r['perplexity']:.1f} |"
                  for r in cell["records"]]
    (out / "heal.json").write_text(json.dumps({"cells": cells}, indent=1))
    (out / "heal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(out: Path) -> None:
    cells = {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}
    original = cells.pop("original", {}).get("original")
    if original is None:
        return _plain_report(out, cells)
    reference = cells.pop("reference", {}).get("records")
    tasks = [t for t in DEFAULT_TASKS if t in original]
    rows, lines = {}, ["# The healing matrix", "",
                       "Every emulator fine-tuned whole (AdamW, every parameter) on public text, measured at each "
                       "budget. Commands per cell are in cells/*.json; the report: `python bench/heal.py "
                       f"--report-only --out {out}`.", "",
                       _provenance(cells), "",
                       f"Original: perplexity {original['perplexity']:.2f}, "
                       + ", ".join(f"{t} {original[t]:.3f}" for t in tasks), ""]
    head = ["emulator", "tokens", "CPU-s", "perplexity", "ppl protected"] + tasks + ["acc protected"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x, spec: "n/a" if x is None else format(x + 0.0, spec)  # noqa: E731
    for label, cell in [("reference", {"records": reference or []})] + sorted(cells.items()):
        cpu = {r["tokens"]: r["cpu_seconds"] for r in cell["records"]}
        rows[label] = gaps(cell["records"], original, reference, tasks)
        for row in rows[label]:
            lines.append("| " + " | ".join([label, f"{row['tokens']:,}", fmt(cpu[row["tokens"]], ".0f"),
                                            f"{row['perplexity']:.1f}", fmt(row.get("ppl_protected"), ".2f")]
                                           + [fmt(row.get(t), ".3f") for t in tasks]
                                           + [fmt(row.get("acc_protected"), ".2f")]) + " |")
    lines += ["", "protected: the share of the random-middle reference's gap to the original (log-perplexity, "
              "or summed accuracy) that the healed emulator still has at the same budget; 1 = the shipped "
              "middle gave nothing, 0 = the original recovered."]
    (out / "heal.json").write_text(json.dumps({"original": original, "rows": rows, "cells": cells}, indent=1))
    (out / "heal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report_only:
        return report(Path(args.out))
    if not args.label or (args.label != "original" and not (args.emulator or args.reference)):
        raise SystemExit("--label and one of --emulator DIR / --reference are needed (or --label original)")
    run(args, argv)


if __name__ == "__main__":
    main()
