"""Compression benchmark: wall time and peak memory of every method next to the forward-backward floor.

For each model size: the floor (``kfac.forward_backward_floor``: one forward + input-gradient backward
over the calibration batches, measured before and after the methods, mean reported), then each
method on the same calibration batches: wall time, CPU time, time as a multiple of the floor, and
peak memory above what was in use before the method started (CPU: process RSS sampled every few
milliseconds; CUDA: ``torch.cuda.max_memory_allocated``). GradOT rows also split their time into
KFAC statistics, scoring and allocation + surgery. With two or more sizes, the exponent ``b`` of
``time ∝ parameters^b`` is fitted per method (least squares on logs). ``--flops`` counts the
floating-point operations of the floor and of the statistics pass on one batch (machine-independent
ratio). ``--compare-ref REV`` adds GradOT rows run with the statistics and scoring code as it
was at git revision REV (before/after in the same run, same machine state).

Sizes: ``default`` (the embedded SmolLM2-135M), and random-initialised Llama-shaped models built
from configs (no download): ``135m`` (SmolLM2-135M's shape), ``360m`` (SmolLM2-360M's), ``1b``
(Llama-3.2-1B's; about 5 GB of float32 weights plus 1 GB of KFAC factors per middle layer: use
``--layers-per-pass``), ``tiny`` (for smoke tests).

    python bench/compress.py --keep 0.4 --threads 1 --out results/compress                  # default, 135m, 360m
    python bench/compress.py --sizes 1b --device cuda --dtype bfloat16 --layers-per-pass 4
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from gradot.methods import get, make_config
from gradot.methods.gradot import collect_and_score, gradot_emulator, middle_linears
from gradot.stats.kfac import collect_kfac, forward_backward_floor
from gradot.modeling import load_model
from gradot.split import split_model
from gradot.methods import DEFAULT_KEEP
from common import PeakRSS, build_emulator, git_commit, machine, write_markdown  # bench/ is on sys.path
from shapes import SIZES, random_llama  # bench/shapes.py (the script's folder is on sys.path)

METHODS = "uniform,crash,svd,gradot-uniform,gradot-global"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="default,135m,360m", help=f"comma-separated: default, {', '.join(SIZES)}")
    p.add_argument("--methods", default=METHODS,
                   help="comma-separated: uniform, crash, svd, gradot-<allocation>[/lppN][/ckpt] (GradOT with N "
                        "layers' statistics per pass, with gradient checkpointing)")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters kept (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--calib-sequences", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--calib-batch", type=int, default=4)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--layers-per-pass", type=int, default=None,
                   help="GradOT statistics for N middle layers per forward-backward pass (large-model path)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpointing in the statistics pass")
    p.add_argument("--flops", action="store_true", help="also count FLOPs of the floor and the statistics (one batch)")
    p.add_argument("--compare-ref", default=None, metavar="REV",
                   help="also run GradOT with the statistics and scoring code of this git revision (before/after)")
    p.add_argument("--profile", action="store_true",
                   help="only a time breakdown of one GradOT (uniform) compression of the first size: forward, "
                        "backward, each KFAC product, SVDs, other scoring, allocation, surgery (CPU timers)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every method this many times, round robin, and report the median run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/compress")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# measurement


def _release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # give freed heap pages back to the OS so the next RSS baseline is honest
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device: torch.device) -> tuple[object, dict]:
    """Run ``fn()``; wall and CPU seconds, peak memory above the starting point (MiB)."""
    _release_memory()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    info = {"wall_s": wall, "cpu_s": cpu, "rss_start_mib": rss.start_rss / 2**20,
            "peak_rss_extra_mib": (rss.peak - rss.start_rss) / 2**20}
    if cuda:
        info["peak_cuda_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    info["peak_extra_mib"] = info["peak_cuda_extra_mib"] if cuda else info["peak_rss_extra_mib"]
    return result, info


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode, mm_flop

    def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return mm_flop(a_shape, b_shape)

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# models, data, methods


def build_model(size: str, dtype, device, seed):
    if size == "default":
        model, tok = load_model("default", dtype=dtype, device=str(device))
        return model, tok
    return random_llama(size, seed=seed, dtype=dtype, device=device), None


def calibration(tok, vocab: int, args, device) -> list[torch.Tensor]:
    n = args.calib_sequences * args.calib_len
    if tok is not None:
        from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path

        try:
            return calibration_batches(tok, CalibrationSpec(str(default_calibration_path()), args.calib_sequences,
                                                            args.calib_len, args.calib_batch))
        except Exception as exc:  # no shared data: random ids have the same cost
            print(f"calibration text unavailable ({exc}); using random token ids", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (n,), generator=g).view(args.calib_sequences, args.calib_len)
    return list(ids.split(args.calib_batch))


def load_ref_modules(rev: str):
    """GradOT's statistics and scoring code as it was at git revision ``rev``: that revision's whole
    package, imported as ``gradot_ref`` (its relative imports resolve inside it), under either
    layout (``kfac``/``gradot_method`` modules, or ``stats.kfac`` and the ``methods.gradot``
    package). Returns ``kfac``, ``gm`` (config, scoring, allocation, surgery) and ``emulator``."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="gradot-ref-"))
    archive = subprocess.check_output(["git", "archive", rev, "src/gradot"], cwd=root)
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    package = tmp / "src" / "gradot"
    spec = importlib.util.spec_from_file_location("gradot_ref", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradot_ref"] = module
    spec.loader.exec_module(module)
    if (package / "gradot_method.py").exists():
        gm = importlib.import_module("gradot_ref.gradot_method")
        return {"kfac": importlib.import_module("gradot_ref.kfac"), "gm": gm,
                "emulator": importlib.import_module("gradot_ref.emulator")}
    return {"kfac": importlib.import_module("gradot_ref.stats.kfac"),
            "gm": importlib.import_module("gradot_ref.methods.gradot"),
            "emulator": importlib.import_module("gradot_ref.emulator")}


def run_method(method: str, model, split, batches, args, ref) -> tuple[object, dict]:
    """Compress; returns (emulator, breakdown of seconds).

    ``method`` is ``uniform``, ``crash``, ``svd``, ``gradot-<allocation>``, optionally followed by
    ``/lppN`` (statistics of N layers per pass), ``/ckpt`` (gradient checkpointing), ``/bf16``
    (bfloat16 KFAC products) and ``/tokF`` (KFAC products over a share F of the tokens) for GradOT,
    or ``@REV`` (the code of ``--compare-ref``)."""
    method, *options = method.split("/")
    name, _, at = method.partition("@")
    layers_per_pass, checkpointing = args.layers_per_pass, args.gradient_checkpointing
    products, token_fraction = torch.float32, 1.0
    for option in options:
        if option == "ckpt":
            checkpointing = True
        elif option == "bf16":
            products = torch.bfloat16
        elif option.startswith("tok"):
            token_fraction = float(option[3:])
        elif option.startswith("lpp") and option[3:].isdigit():
            layers_per_pass = int(option[3:])
        else:
            raise SystemExit(f"unknown method option /{option} (known: /lppN, /ckpt, /bf16, /tokF)")
    if not name.startswith("gradot-"):  # any other registered method, as the library builds it
        return build_emulator(name, model, split, args.keep, batches=batches), {}
    allocation = name[len("gradot-"):]
    if at:  # the reference revision's code path: collect_kfac over every middle linear, then score
        gm, kfac = ref["gm"], ref["kfac"]
        cfg = gm.GradOTConfig(keep=args.keep, allocation=allocation)
        t0 = time.perf_counter()
        factors = kfac.collect_kfac(model, gm.middle_linears(model, split), batches, progress=False,
                                    gradient_checkpointing=checkpointing)
        t1 = time.perf_counter()
        scores = gm.score_middle(model, split, factors, cfg)
        del factors
        t2 = time.perf_counter()
        target = round(cfg.keep * ref["emulator"].middle_parameter_count(model, split))
        plan = (gm.allocate_uniform(scores, target) if allocation == "uniform"
                else gm.allocate_global(scores, target, layers=allocation == "global-layers"))
        emu = gm.build_from_plan(model, split, scores, plan, method="gradot", cfg=cfg, settings={})
        return emu, {"statistics_s": t1 - t0, "scores_s": t2 - t1, "build_s": time.perf_counter() - t2}
    cfg = make_config(get("gradot").config, args.keep, {"allocation": allocation}).engine()
    timings: dict = {}
    t0 = time.perf_counter()
    scores = collect_and_score(model, split, cfg, batches, layers_per_pass=layers_per_pass,
                               gradient_checkpointing=checkpointing, progress=False, timings=timings,
                               products=products, token_fraction=token_fraction)
    t1 = time.perf_counter()
    emu = gradot_emulator(model, split, cfg, None, scores=scores)
    timings["build_s"] = time.perf_counter() - t1
    return emu, timings


def profile_gradot(model, split, batches, args) -> list[tuple[str, float]]:
    """Where one GradOT compression spends its time: wall-clock timers around the library's own
    functions (patched for the duration; exact on CPU, where nothing runs asynchronously)."""
    import gradot.methods.gradot.allocate as allocate
    import gradot.methods.gradot.build as build
    import gradot.methods.gradot.scores as scores_mod
    import gradot.methods.gradot.units as units
    import gradot.stats.kfac as kfac
    from gradot.emulator import middle_parameter_count
    from gradot.methods.gradot import GradOTConfig

    spent: dict[str, float] = {}

    def timed(label, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    patches = [
        (kfac, "_loss_sum", timed("forward (model + loss)", kfac._loss_sum)),
        (kfac._ASum, "add", timed("A = x xᵀ (shared inputs once)", kfac._ASum.add)),
        (kfac, "_accumulate_gram", timed("_gram", kfac._accumulate_gram)),
        (kfac, "_accumulate", timed("grad = g xᵀ", kfac._accumulate)),
        (kfac, "_symmetrize_", timed("mirror A, G", kfac._symmetrize_)),
        (scores_mod.torch.linalg, "svd", timed("SVD (attention weights)", torch.linalg.svd)),
        (units, "_removal_terms", timed("whole-layer cost (G W A)", units._removal_terms)),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    cfg = GradOTConfig(keep=args.keep)
    try:
        for obj, name, new in patches:
            setattr(obj, name, new)
        t0 = time.perf_counter()
        factors = kfac.collect_kfac(model, middle_linears(model, split), batches, progress=False,
                                    gradients=units.needs_gradients(cfg))
        t1 = time.perf_counter()
        scores = units.score_middle(model, split, factors, cfg)
        t2 = time.perf_counter()
        plan = allocate.allocate_uniform(scores, round(cfg.keep * middle_parameter_count(model, split)))
        t3 = time.perf_counter()
        build.build_from_plan(model, split, scores, plan, method="gradot", cfg=cfg, settings={})
        t4 = time.perf_counter()
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
    a = spent.get("A = x xᵀ (shared inputs once)", 0.0)
    g = spent.pop("_gram", 0.0) - a  # the Gram products not made by A's accumulator are G's
    hooks = a + g + spent.get("grad = g xᵀ", 0.0)
    stats = t1 - t0
    rows = [("forward (model + loss)", spent.get("forward (model + loss)", 0.0)),
            ("backward (autograd, without the hooks)", stats - spent.get("forward (model + loss)", 0.0) - hooks
             - spent.get("mirror A, G", 0.0)),
            ("A = x xᵀ (shared inputs once)", a), ("G = g gᵀ", g), ("grad = g xᵀ", spent.get("grad = g xᵀ", 0.0)),
            ("mirror A, G", spent.get("mirror A, G", 0.0)),
            ("SVD (attention weights)", spent.get("SVD (attention weights)", 0.0)),
            ("whole-layer cost (G W A)", spent.get("whole-layer cost (G W A)", 0.0)),
            ("other scoring (G U, A Vᵀ, channel terms, sorting)",
             t2 - t1 - spent.get("SVD (attention weights)", 0.0) - spent.get("whole-layer cost (G W A)", 0.0)),
            ("allocation", t3 - t2), ("surgery (build the emulator)", t4 - t3)]
    return [("total", t4 - t0)] + rows


def fit_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) on log(parameters)."""
    pts = [(math.log(p), math.log(t)) for p, t in points if p > 0 and t > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s != "default" and s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; known: default, {', '.join(SIZES)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ref = None
    if args.compare_ref:
        ref = load_ref_modules(args.compare_ref)
        methods += [f"{m}@{args.compare_ref}" for m in methods if m.startswith("gradot-") and "/" not in m]
    started = machine(device)
    tok = None
    rows, floors = [], {}
    for size in sizes:
        torch.manual_seed(args.seed)
        model, size_tok = build_model(size, dtype, device, args.seed)
        if size_tok is not None:
            tok = size_tok
        elif tok is None:
            try:
                _, tok = load_model("default")  # only its tokenizer: real calibration text
                _release_memory()
            except Exception:  # noqa: BLE001 - no default model installed: random ids instead
                tok = None
        params = sum(p.numel() for p in model.parameters())
        split = split_model(model, 2)
        batches = calibration(tok, model.config.vocab_size, args, device)
        tokens = sum(b.numel() for b in batches)
        print(f"\n== {size}: {params / 1e6:.1f} M parameters, {len(split.middle)} middle layers, "
              f"{tokens} calibration tokens ==", flush=True)
        forward_backward_floor(model, batches[:1])  # warm-up (allocator, kernels)
        floor_runs = []
        if args.profile:
            floor_s = forward_backward_floor(model, batches)
            breakdown = profile_gradot(model, split, batches, args)
            floor_s = (floor_s + forward_backward_floor(model, batches)) / 2
            command = "python bench/compress.py " + " ".join(sys.argv[1:] if argv is None else argv)
            lines = ["# Where GradOT compression spends its time", "", f"Command: `{command}`  ",
                     f"Commit: {git_commit()}; date {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
                     f"machine: {started}  ",
                     f"Model {size}, {tokens} calibration tokens, GradOT uniform allocation, keep {args.keep}; "
                     f"floor (mean of a run before and after): {floor_s:.1f} s.", "",
                     "| part | s | × floor | share |", "|---|---|---|---|"]
            total = breakdown[0][1]
            for label, sec in breakdown:
                lines.append(f"| {label} | {sec:.2f} | {sec / floor_s:.2f} | {sec / total:.0%} |")
            (out / "profile.md").write_text("\n".join(lines) + "\n")
            (out / "profile.json").write_text(json.dumps({"command": command, "floor_s": floor_s, "tokens": tokens,
                                                          "breakdown": breakdown}, indent=2))
            print("\n".join(lines))
            return

        def floor_once():
            seconds, info = measure(lambda: forward_backward_floor(
                model, batches, gradient_checkpointing=args.gradient_checkpointing), device)
            info["timed_s"] = seconds
            floor_runs.append(info)
            print(f"  floor: {info['wall_s']:.1f} s wall, {info['cpu_s']:.1f} s CPU, "
                  f"peak +{info['peak_extra_mib']:.0f} MiB", flush=True)

        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for repeat in range(args.repeats):  # round robin: drifting machine load hits every method alike
            floor_once()
            for method in methods:
                emu, info = measure(lambda: run_method(method, model, split, batches, args, ref), device)
                emu, breakdown = emu
                info.update(breakdown)
                info.update({"size": size, "params": params, "method": method,
                             "keep_achieved": emu.manifest["size"]["keep_achieved"]})
                del emu
                runs[method].append(info)
                extra = "".join(f", {k[:-2]} {v:.1f} s" for k, v in breakdown.items())
                print(f"  {method}: {info['wall_s']:.1f} s wall, {info['cpu_s']:.1f} s CPU, "
                      f"peak +{info['peak_extra_mib']:.0f} MiB{extra}", flush=True)
        floor_once()
        size_rows = []
        for method in methods:  # the run with the median wall time (its breakdown with it)
            ordered = sorted(runs[method], key=lambda r: r["wall_s"])
            row = dict(ordered[(len(ordered) - 1) // 2])
            row["runs_wall_s"] = [r["wall_s"] for r in runs[method]]
            size_rows.append(row)
        floor = {k: sum(r[k] for r in floor_runs) / len(floor_runs) for k in ("wall_s", "cpu_s", "peak_extra_mib")}
        if args.repeats > 1:  # median, like the methods
            mid = sorted(floor_runs, key=lambda r: r["wall_s"])[(len(floor_runs) - 1) // 2]
            floor.update({k: mid[k] for k in ("wall_s", "cpu_s")})
        floor["runs_wall_s"] = [r["wall_s"] for r in floor_runs]
        floor["params"] = params
        floor["tokens"] = tokens
        if args.flops:
            ck = collect_kfac
            one = batches[:1]
            f_floor = count_flops(lambda: forward_backward_floor(model, one))
            f_stats = count_flops(lambda: ck(model, middle_linears(model, split), one, progress=False))
            f_light = count_flops(lambda: ck(model, middle_linears(model, split), one, progress=False, gradients=False))
            floor["flops_per_token"] = {"floor": f_floor / one[0].numel(), "statistics": f_stats / one[0].numel(),
                                        "statistics_no_grad": f_light / one[0].numel()}
            if ref is not None:
                f_ref = count_flops(lambda: ref["kfac"].collect_kfac(model, middle_linears(model, split), one,
                                                                     progress=False))
                floor["flops_per_token"]["statistics_ref"] = f_ref / one[0].numel()
            print(f"  FLOPs per token: floor {f_floor / one[0].numel() / 1e6:.0f} M, statistics "
                  f"{f_stats / one[0].numel() / 1e6:.0f} M ({f_stats / f_floor:.2f}× floor), without grad "
                  f"{f_light / one[0].numel() / 1e6:.0f} M ({f_light / f_floor:.2f}×)", flush=True)
        floors[size] = floor
        for r in size_rows:
            r["x_floor"] = r["wall_s"] / floor["wall_s"]
            r["x_floor_cpu"] = r["cpu_s"] / floor["cpu_s"]
        rows += size_rows
        del model, batches
        _release_memory()

    exponents = {}
    distinct = {floors[s]["params"] for s in floors}
    if len(distinct) >= 2:
        exponents["floor"] = fit_exponent([(f["params"], f["wall_s"]) for f in floors.values()])
        for method in methods:
            exponents[method] = fit_exponent([(r["params"], r["wall_s"]) for r in rows if r["method"] == method])

    command = "python bench/compress.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"command": command, "git_commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": started,
            "settings": vars(args), "floors": floors, "rows": rows, "exponents": exponents}
    (out / "compress.json").write_text(json.dumps(info, indent=2))
    mem = "CUDA max_memory_allocated" if device.type == "cuda" else "process RSS, sampled every 5 ms"
    lines = [
        "# Compression benchmark", "",
        f"Command: `{command}`  ",
        f"Commit: {info['git_commit']}; date {info['date']}; machine: {started}  ",
        f"Calibration: {args.calib_sequences}×{args.calib_len} tokens in batches of {args.calib_batch}; keep {args.keep}; "
        f"{args.dtype} on {args.device}"
        + (f"; statistics {args.layers_per_pass} layer(s) per pass" if args.layers_per_pass else "")
        + ("; gradient checkpointing" if args.gradient_checkpointing else "") + ".  ",
        f"Floor: one forward + input-gradient backward over the same batches ("
        + ("mean of the runs before and after the methods" if args.repeats == 1 else
           f"median of {args.repeats + 1} runs interleaved with the methods; methods: median of {args.repeats} runs")
        + f"). Peak memory: above what was in use when the method started ({mem}).", "",
        "| model | params | method | wall s | × floor | CPU s | × floor (CPU) | peak +MiB | statistics s | scores s | "
        "allocate+build s | achieved keep |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, f in floors.items():
        runs = ", ".join(f"{w:.1f}" for w in f["runs_wall_s"])
        lines.append(f"| {size} | {f['params'] / 1e6:.0f} M | **floor** | {f['wall_s']:.1f} ({runs}) | 1 | "
                     f"{f['cpu_s']:.1f} | 1 | {f['peak_extra_mib']:.0f} | | | | |")
        for r in rows:
            if r["size"] != size:
                continue

            def cell(k):
                return f"{r[k]:.1f}" if k in r else ""

            lines.append(f"| {size} | {r['params'] / 1e6:.0f} M | {r['method']} | {r['wall_s']:.1f} | "
                         f"{r['x_floor']:.2f} | {r['cpu_s']:.1f} | {r['x_floor_cpu']:.2f} | {r['peak_extra_mib']:.0f} | "
                         f"{cell('statistics_s')} | {cell('scores_s')} | {cell('build_s')} | {r['keep_achieved']:.3f} |")
    if any("flops_per_token" in f for f in floors.values()):
        has_ref = any("statistics_ref" in f.get("flops_per_token", {}) for f in floors.values())
        ref_head = f" statistics at {args.compare_ref} | × floor |" if has_ref else ""
        lines += ["", "FLOPs per calibration token (counted with torch.utils.flop_counter on one batch; SVDs not counted). "
                  "Statistics with grad: what a nonzero λ needs; without: what λ = 0 (the default) collects:", "",
                  f"| model | floor | statistics with grad | × floor | statistics without grad | × floor |{ref_head}",
                  "|---|---|---|---|---|---|" + ("---|---|" if has_ref else "")]
        for size, f in floors.items():
            if "flops_per_token" in f:
                fl = f["flops_per_token"]
                extra = (f" {fl['statistics_ref'] / 1e6:.0f} M | {fl['statistics_ref'] / fl['floor']:.2f} |"
                         if "statistics_ref" in fl else "")
                lines.append(f"| {size} | {fl['floor'] / 1e6:.0f} M | {fl['statistics'] / 1e6:.0f} M | "
                             f"{fl['statistics'] / fl['floor']:.2f} | {fl['statistics_no_grad'] / 1e6:.0f} M | "
                             f"{fl['statistics_no_grad'] / fl['floor']:.2f} |{extra}")
    if exponents:
        lines += ["", "Growth with size: exponent b of wall time ∝ parameters^b (least squares on logs, "
                  f"{len(distinct)} sizes):", "", "| method | b |", "|---|---|"]
        for method, b in exponents.items():
            lines.append(f"| {method} | {b:.2f} |" if b is not None else f"| {method} | – |")
    write_markdown(out / "compress.md", lines)


if __name__ == "__main__":
    main()
