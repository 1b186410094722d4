"""The trained baselines (``distill``: OT's distilled emulator, ``scaleot``: ScaleOT's harmonizers)
against the training-free methods: build time, achieved keep, the distillation loss on held-back
calibration text before and after training, and WikiText-2 test perplexity of the emulator.

Each method label is a registered method, or one of the variants below; every emulator is built
from the same calibration batches (WikiText-2 validation text) and measured on the same test text::

    distill          distill from the uniform layer drop (OT with KD)
    distill-gradot   distill from the GradOT emulator (--init gradot)
    scaleot          bypass-loss importance (the default)
    scaleot-uniform  evenly spaced replaced layers (the control of the importance estimator)

Results go to ``OUT/rows/<label>.json`` as each finishes (a rerun skips finished labels), then
``OUT/trained.json`` and ``OUT/trained.md``.

    OMP_NUM_THREADS=1 python bench/trained.py --keep 0.4 --out results/trained

On a GPU (build time at larger shapes; a random model's perplexity says nothing about quality)::

    python bench/trained.py --model random:1b --tokenizer TOKENIZER_DIR --device cuda --dtype bfloat16 \
        --methods uniform,gradot,distill,scaleot --out OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradot.methods import DEFAULT_KEEP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpu_sync, table_row, write_markdown  # noqa: E402

VARIANTS = {
    "distill-gradot": ("distill", {"init": "gradot"}),
    "scaleot-uniform": ("scaleot", {"importance": "uniform"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default', a local model folder, or random:<size> (a random Llama of bench/shapes.py's shapes)")
    p.add_argument("--tokenizer", default=None,
                   help="with random:<size>: a tokenizer folder (default: the default model's tokenizer)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters kept (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--methods", default="uniform,gradot,distill,scaleot,scaleot-uniform,distill-gradot")
    p.add_argument("--calib-sequences", type=int, default=40)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--distill-steps", type=int, default=30)
    p.add_argument("--distill-batch", type=int, default=4)
    p.add_argument("--ppl-sequences", type=int, default=16)
    p.add_argument("--ppl-len", type=int, default=256)
    p.add_argument("--out", default="results/trained")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    from gradot.methods import Calibration, get, make_config
    from gradot.provenance import git_commit
    from gradot.analysis.proxy import perplexity
    from gradot.split import split_model
    from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path

    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    from shapes import load_bench_model

    model, tok = load_bench_model(args.model, args.tokenizer, dtype, args.device)
    model.eval()
    calib = CalibrationSpec(str(default_calibration_path()), args.calib_sequences, args.calib_len, 8)
    batches = calibration_batches(tok, calib)
    test = CalibrationSpec(str(Path(calib.path).with_name("wiki.test.raw")), args.ppl_sequences, args.ppl_len, 4)
    test_batches = calibration_batches(tok, test)
    split = split_model(model, 2)
    rows = []
    original = out / "rows" / "original.json"
    if not original.exists():
        original.write_text(json.dumps({"label": "original", "ppl": perplexity(model, test_batches)}))
    rows.append(json.loads(original.read_text()))
    for label in args.methods.split(","):
        path = out / "rows" / f"{label}.json"
        if path.exists():
            rows.append(json.loads(path.read_text()))
            continue
        name, options = VARIANTS.get(label, (label, {}))
        method = get(name)
        options = {**options, "distill_steps": args.distill_steps, "distill_batch": args.distill_batch}
        config = make_config(method.config, args.keep, options)
        gpu_sync(args.device)
        start = time.perf_counter()
        emu = method.build(model, split, config, Calibration(batches, calib.describe()) if method.needs_calibration
                           else None)
        gpu_sync(args.device)
        seconds = time.perf_counter() - start
        settings = emu.manifest["settings"]
        training = settings.get("training", {})
        row = {"label": label, "method": name, "options": options if name in ("distill", "scaleot") else {},
               "build_s": round(seconds, 1), "keep_achieved": emu.manifest["size"]["keep_achieved"],
               "depth": emu.manifest["size"]["emulator_depth"], "ppl": perplexity(emu.model, test_batches),
               "heldout": training.get("heldout"), "train_s": training.get("seconds"),
               "steps": training.get("steps"), "tokens": training.get("tokens")}
        if name == "scaleot":
            row["harmonizers"] = settings["harmonizers"]
            row["importance"] = settings["importance"]
            row["select_s"] = settings["select_seconds"]
        path.write_text(json.dumps(row, indent=1))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("label", "build_s", "keep_achieved", "ppl")}), flush=True)
        del emu
    where = (f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}" if args.device.startswith("cuda")
             else f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}")
    meta = {"command": ("" if args.device.startswith("cuda") else "OMP_NUM_THREADS=1 ")
            + "python bench/trained.py " + " ".join(sys.argv[1:]),
            "commit": git_commit(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": where, "dtype": args.dtype,
            "args": vars(args), "calibration": calib.describe(), "test": test.describe()}
    (out / "trained.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Trained baselines against training-free methods", "",
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}; date {meta['date']}; machine: {meta['machine']}  ",
             f"Model {args.model} ({args.dtype} on {args.device}), keep {args.keep}, k = 2. Calibration / training text: WikiText-2 validation, "
             f"{args.calib_sequences} × {args.calib_len} tokens (distill/scaleot: {args.distill_batch} sequences a step, "
             f"the last batch held back). Perplexity: WikiText-2 test, {args.ppl_sequences} × {args.ppl_len} tokens.",
             "", "| emulator | build s | of which training s | steps × tokens | keep achieved | depth | "
             "held-back distill loss before → after | WikiText-2 test ppl |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r.get("heldout") or {}
        lines.append(table_row([
            r["label"], r.get("build_s", ""), r.get("train_s") or "",
            f"{r['steps']} × {r['tokens'] // max(1, r['steps'])}" if r.get("steps") else "",
            f"{r['keep_achieved']:.3f}" if "keep_achieved" in r else "", r.get("depth", ""),
            f"{h['loss_before']:.3f} → {h['loss_after']:.3f}" if h else "", f"{r['ppl']:.1f}"]))
    write_markdown(out / "trained.md", lines)


if __name__ == "__main__":
    main()
