"""Privacy benchmark: what a data owner holding the emulator can learn of the original model.

Per method at the same budget (``--keep``), on one model:

(a) for every weight matrix of every original middle layer, the relative Frobenius error
    ``||W - Ŵ|| / ||W||`` of the attacker's reconstruction from what the emulator ships (its saved
    and re-loaded artifact, exactly what the data owner receives): ``own`` uses only what ships for
    that layer (nothing -> Ŵ = 0), ``best`` also tries every same-role, same-shape matrix the
    emulator ships for another layer (chosen with the original in hand: an optimistic bound);
    aggregated as the mean over matrices, the block-level error, and the fraction of middle-block
    parameters shipped bit-exactly (see ``gradot.analysis.privacy``);
(b) emulator token perplexity on the first tokens of WikiText-2 test (not the harness's word
perplexity) against the original's;
(c) from a pipeline results JSON (``--pipeline-json``, optional): Emu ZS accuracy and
    Δ = Plug-in − Emu FT, the task-level measures of the same question.

The trained methods (``distill``, ``scaleot``) are built through the registry like the others; their
training text is its own set of WikiText-2 valid sequences (``--train-sequences`` × ``--train-len``,
cut into batches of ``--train-batch``: the last ``--distill-batch`` sequences are held back), and
their budget is ``--distill-steps`` steps of ``--distill-batch`` sequences (defaults: the
results/trained recipe, 30 steps of 4 × 128 tokens, minutes on a CPU; the command line's default is
100 steps). ``--option NAME=VALUE`` sets any other registered method option (``init=gradot``,
``harmonizer_lr=3e-3``). A trained layer is measured against the original layer its slot names; its
entries are not bit-exact (see ``gradot.analysis.privacy``).

    nice -n 10 python bench/privacy.py --model default --keep 0.4 --calib-sequences 8 --calib-len 256 --ppl-sequences 4
    OMP_NUM_THREADS=1 nice -n 10 python bench/privacy.py --model default --keep 0.4 --calib-sequences 8 \
        --calib-len 256 --ppl-sequences 4 --methods uniform,gradot,distill,scaleot --out results/privacy-trained
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradot.artifacts import load_emulator, save_emulator
from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path
from gradot.methods import DEFAULT_KEEP
from gradot.methods.gradot import middle_linears
from gradot.stats.kfac import collect_kfac
from gradot.modeling import load_model
from gradot.analysis.privacy import measure
from gradot.analysis.proxy import perplexity
from gradot.split import split_model
from gradot.evaluation.tasks import resolve_data_dir
from common import build_emulator, git_commit, method_variant  # bench/ is on sys.path when a script runs

METHODS = ("uniform", "crash", "svd", "gradot", "gradot-global-layers", "distill", "scaleot")
#: Methods trained on text (their emulator is built from the training text, not the calibration text).
TRAINED = ("distill", "scaleot")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', a local Hugging Face folder or a .gguf file")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP, help="fraction of middle-block parameters every method keeps (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--adapter-layers", type=int, default=2)
    p.add_argument("--methods", default="uniform,crash,svd,gradot",
                   help=f"comma-separated, from {', '.join(METHODS)} (gradot: global allocation, lambda 0)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.0, help="GradOT lambda (attention and MLP)")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--ppl-sequences", type=int, default=8)
    p.add_argument("--ppl-len", type=int, default=512)
    g = p.add_argument_group("trained methods (distill, scaleot)")
    g.add_argument("--distill-steps", type=int, default=30, help="training steps (CLI default 100)")
    g.add_argument("--distill-batch", type=int, default=4, help="sequences per training step")
    g.add_argument("--train-sequences", type=int, default=40, help="WikiText-2 valid sequences of training text")
    g.add_argument("--train-len", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--train-batch", type=int, default=8,
                   help="batch size the training text is cut into (scaleot's --importance-batches count these)")
    g.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="any other registered method option (repeatable), e.g. init=gradot")
    p.add_argument("--pipeline-json", default=None, help="results.json of `gradot pipeline` (for Emu ZS and Δ)")
    p.add_argument("--out", default="results/privacy")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def pipeline_rows(path: str | None, methods: list[str], keep: float) -> tuple[dict, str]:
    """Emu ZS average accuracy and Δ per method from a pipeline results JSON, and a note."""
    if not path:
        return {}, "n/a — run gradot pipeline"
    p = Path(path)
    if not p.is_file():
        return {}, f"n/a — {path} not found (run gradot pipeline)"
    info = json.loads(p.read_text())
    table = info.get("table", {})
    rows = {}
    for m in methods:
        row = {}
        for label, key in (("Emu ZS", "emu_zs"), ("Δ", "delta"), ("Emu FT", "emu_ft"), ("Plug-in", "plugin")):
            values = table.get(f"{m}: {label}", {})
            if "avg" in values:
                row[key] = values["avg"]
        if row:
            rows[m] = row
    full = table.get("Full ZS", {}).get("avg")
    if full:
        rows["_full_zs"] = full
    pkeep = info.get("config", {}).get("keep")
    note = f"from {path}" + (f" (pipeline keep {pkeep}, this run {keep})" if pkeep is not None and pkeep != keep else "")
    return rows, note


def method_options(args) -> dict:
    """The method options the bench sets: λ, the trained methods' budget, and every ``--option``
    (typed by the registered option's kind)."""
    from gradot.methods import method_options as registered

    known = registered()
    options = {"lambda_attn": args.lam, "lambda_mlp": args.lam,
               "distill_steps": args.distill_steps, "distill_batch": args.distill_batch}
    for item in args.option:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise SystemExit(f"--option {item!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(known))}")
        kind = known[name][0].metadata["kind"]
        options[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return options


def build(method: str, model, split, keep: float, options: dict, calib, train, get_factors):
    """``method`` through the registry (``gradot`` is its global allocation, ``gradot-global-layers``
    the whole-layer one); KFAC factors collected once, only if a method needs them. The trained
    methods read ``train`` as their text."""
    label = "gradot-global" if method == "gradot" else method
    return build_emulator(label, model, split, keep, batches=train if method in TRAINED else calib,
                          factors=get_factors, options=options, method_name=method)


def training_summary(manifest: dict) -> dict | None:
    """What a trained emulator's manifest records of its training (None for the others)."""
    run = manifest.get("settings", {}).get("training")
    if not run:
        return None
    held = run.get("heldout") or {}
    out = {k: run.get(k) for k in ("steps", "tokens", "lr", "trained_params", "seconds")}
    out.update(loss_before=held.get("loss_before"), loss_after=held.get("loss_after"))
    harmonizers = manifest["settings"].get("harmonizers")
    if harmonizers is not None:
        out["harmonizers"] = [h["replaces"] for h in harmonizers]
    return out


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def main(argv=None):
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:  # an unknown name fails here, not after the model is loaded
        method_variant("gradot-global" if m == "gradot" else m)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    model, tok = load_model(args.model)
    split = split_model(model, args.adapter_layers)
    calib = calibration_batches(tok, CalibrationSpec(str(default_calibration_path()), args.calib_sequences,
                                                     args.calib_len, args.calib_batch))
    test_text = resolve_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"
    ppl_batches = calibration_batches(tok, CalibrationSpec(str(test_text), args.ppl_sequences, args.ppl_len, 2))
    options = method_options(args)
    train = None
    if any(m in TRAINED for m in methods):
        train = calibration_batches(tok, CalibrationSpec(str(default_calibration_path()), args.train_sequences,
                                                         args.train_len, args.train_batch))
    original_ppl = perplexity(model, ppl_batches)
    print(f"original: WikiText-2 test token perplexity {original_ppl:.2f}", flush=True)

    factors = None

    def get_factors():
        nonlocal factors
        if factors is None:
            t0 = time.perf_counter()
            factors = collect_kfac(model, middle_linears(model, split), calib, progress=False)
            print(f"KFAC statistics: {time.perf_counter() - t0:.1f} s", flush=True)
        return factors

    pipe, pipe_note = pipeline_rows(args.pipeline_json, methods, args.keep)
    results = []
    for method in methods:
        t0 = time.perf_counter()
        emu = build(method, model, split, args.keep, options, calib, train, get_factors)
        build_s = time.perf_counter() - t0
        # Measure the artifact the data owner actually receives: saved, then re-loaded and validated.
        with tempfile.TemporaryDirectory(prefix="gradot-privacy-") as tmp:
            save_emulator(emu, Path(tmp) / "emu")
            shipped = load_emulator(Path(tmp) / "emu")
        del emu
        report = measure(model, shipped.model, shipped.manifest, split.middle)
        ppl = perplexity(shipped.model, ppl_batches)
        size = shipped.manifest["size"]
        row = {
            "method": method, "keep_achieved": size["keep_achieved"], "depth": size["emulator_depth"],
            "emulator_params": size["emulator_params"], "perplexity": ppl, "build_seconds": build_s,
            **report.summary(), "training": training_summary(shipped.manifest), "pipeline": pipe.get(method, {}),
            "layers": report.to_dict()["layer_status"], "per_matrix": report.to_dict()["matrices"],
        }
        results.append(row)
        print(f"{method:22s} keep {row['keep_achieved']:.3f}  own error {row['mean_own_error']:.3f}  "
              f"best error {row['mean_best_error']:.3f}  exact {row['exact_fraction']:.3f}  ppl {ppl:.1f}  "
              f"({build_s:.1f} s)", flush=True)
        del shipped

    command = "python bench/privacy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {
        "command": command, "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}, CPU",
        "model": args.model, "settings": vars(args), "original_perplexity": original_ppl,
        "middle_layers": split.middle, "pipeline_note": pipe_note, "pipeline_full_zs": pipe.get("_full_zs"),
        "seconds": time.perf_counter() - t_start, "rows": results,
    }
    (out / "privacy.json").write_text(json.dumps(info, indent=1))
    md = markdown(info, args)
    (out / "privacy.md").write_text(md)
    print(md)


def markdown(info: dict, args) -> str:
    rows = info["rows"]
    lines = [
        f"# Privacy benchmark ({info['model']}, keep {args.keep})", "",
        f"Command: `{info['command']}`  ",
        f"Commit {info['git_commit']}; {info['date']}; {info['machine']}; {info['seconds'] / 60:.1f} min  ",
        f"Calibration: {args.calib_sequences}×{args.calib_len} WikiText-2 valid tokens; perplexity: "
        f"{args.ppl_sequences}×{args.ppl_len} WikiText-2 test tokens. Original perplexity "
        f"**{info['original_perplexity']:.2f}**.", "",
        "Reconstruction error is ‖W − Ŵ‖/‖W‖ per middle weight matrix (1 = nothing learned, 0 = exact copy). "
        "*own*: what the emulator ships for that layer (dropped → Ŵ = 0); *best*: the best of that, zero, and any "
        "same-role same-shape matrix the emulator ships for another layer (an optimistic bound for the attacker). "
        "*block*: one relative error over all middle matrices together. *exact*: fraction of middle-block "
        "parameters shipped bit-exactly (a trained entry is not).", "",
        "| method | achieved keep | depth | mean error own | mean error best | block error own | block error best "
        "| exact | perplexity | Emu ZS | Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["pipeline"]
        zs = f"{100 * p['emu_zs'][0]:.1f}" if "emu_zs" in p else "n/a"
        d = f"{100 * p['delta'][0]:+.1f}" if "delta" in p else "n/a"
        lines.append(
            f"| {r['method']} | {r['keep_achieved']:.3f} | {r['depth']} | {r['mean_own_error']:.3f} | "
            f"{r['mean_best_error']:.3f} | {r['block_own_error']:.3f} | {r['block_best_error']:.3f} | "
            f"{r['exact_fraction']:.3f} | {r['perplexity']:.1f} | {zs} | {d} |")
    lines += ["", f"Emu ZS (task-average accuracy, %) and Δ = Plug-in − Emu FT: {info['pipeline_note']}."]
    if info.get("pipeline_full_zs"):
        lines[-1] += f" Full ZS {100 * info['pipeline_full_zs'][0]:.1f}."
    trained = [r for r in rows if r.get("training")]
    if trained:
        lines += ["", f"Trained methods: {args.distill_steps} steps of {args.distill_batch} sequences of "
                  f"{args.train_len} tokens from {args.train_sequences} WikiText-2 valid sequences (the last "
                  f"{args.distill_batch} held back)" + (f"; options {', '.join(args.option)}" if args.option else "")
                  + ".", "", "| method | steps | tokens | trained parameters | training s | held-back distill loss "
                  "before → after | harmonizer spans |", "|---|---|---|---|---|---|---|"]
        for r in trained:
            t = r["training"]
            spans = "; ".join(f"{h[0]}–{h[-1]}" if len(h) > 1 else str(h[0])
                              for h in t.get("harmonizers") or [])
            lines.append(f"| {r['method']} | {t['steps']} | {t['tokens']} | {t['trained_params']:,} | "
                         f"{t['seconds']} | {fmt(t['loss_before'])} → {fmt(t['loss_after'])} | {spans or '–'} |")
    # Per-layer view: what ships of each original middle layer, and its mean own error.
    lines += ["", "What ships of each original middle layer (mean own error over its matrices). *kept*: a "
              "bit-exact copy; *modified*: shipped at full shape but not bit-exactly (a distilled layer); "
              "*harmonizer*: the first layer of a span a ScaleOT harmonizer stands in for (the harmonizer was cut "
              "from it, then trained); *replaced*: another layer of that span (nothing of it ships); *nothing*: "
              "dropped.", "",
              "| layer | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for layer in info["middle_layers"]:
        cells = []
        for r in rows:
            errs = [m["own_error"] for m in r["per_matrix"] if m["layer"] == layer]
            cells.append(f"{r['layers'][str(layer)]} {sum(errs) / len(errs):.2f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
