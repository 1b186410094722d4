"""The privacy-utility frontier of every method, from cells already computed (loads no model).

Loss frontier (``bench/transfer.py`` cells, one recipe): per task and method, loss transfer against
the emulator's privacy figures: WikiText-2 test perplexity and its own held-out answer loss before
training (higher = a worse stand-alone model = more private). Only emulators that differ from the
bench's defaults by method, keep and allocation enter: each method is one curve over keep, and a
non-default allocation is a curve of its own (``gradot global-layers``).

Dominance: for every point of another method, GradOT's transfer at the same privacy, linearly
interpolated between neighbouring keeps of its curve (in log perplexity, or in held-out loss; privacy
is not always monotone in keep, so the best segment reaching that privacy counts); a point outside
GradOT's measured range is reported as not covered, never extrapolated. The ± of a
difference combines the point's standard error with the larger of the two neighbours'.

Across tasks (``mean_curves``): each method's curve averaged over the folder's tasks, at the keeps
measured on every one of them, compared the same way (a task is a sample of what a data owner may
bring, and single tasks disagree: docs/notes/2026-11-30-transfer-rounds.md, sixth round).

Accuracy frontier (optional ``--pipelines``: pipeline output folders): per method, task and keep,
Emu ZS (privacy) against Plug-in and the transfer ratio.

    python bench/frontier.py --recipe steps=30,lr=3e-4 --pipelines results/pipeline-keep0.7-lr3e-4 \\
        --out results/frontier
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import git_commit  # bench/ is on sys.path when a script runs
from transfer import EMULATOR_DEFAULTS, RECIPE_DEFAULTS, RECIPE_KEYS, mean, parse_spec, slug

REFERENCE = "gradot"
COLORS = {"gradot": "tab:orange", "uniform": "tab:red", "crash": "tab:blue", "gradot global-layers": "tab:green",
          "svd": "tab:purple", "wanda": "tab:brown"}  # one colour per method in every panel
MEAN_TASK = "mean"  # the across-task curves' task label (``mean_curves``)
PRIVACY = {"ppl": "emulator perplexity (WikiText-2 test, log scale)", "loss": "emulator held-out answer loss"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfer-dir", default="results/transfer", help="bench/transfer.py output folder")
    p.add_argument("--recipe", default="steps=30,lr=3e-4", help="the data owner's recipe the curves use")
    p.add_argument("--methods", default="uniform,crash,svd,wanda,gradot")
    p.add_argument("--pipelines", nargs="*", default=[], help="pipeline output folders (accuracy points)")
    p.add_argument("--heal", help="bench/heal.py output folder: the accuracy points against what healing leaves")
    p.add_argument("--heal-tasks", default="arc_easy,sciq,webquestions",
                   help="tasks whose accuracy transfer is averaged for the healing panel (a point needs all)")
    p.add_argument("--out", default="results/frontier")
    return p.parse_args(argv)


def loss_points(folder: Path, recipe: dict, methods: list[str]) -> dict[tuple[str, str], list[dict]]:
    """(task, method) -> points sorted by keep: keep, ppl, held-out loss, transfer ± se."""
    emulators = {p.stem[len("emulator-"):]: json.loads(p.read_text()) for p in folder.glob("emulator-*.json")}
    curves: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(folder.glob("cell-*.json")):
        cell = json.loads(path.read_text())
        spec = cell["emulator"]
        plain = {k: v for k, v in spec.items() if k not in ("method", "keep", "allocation")}
        if cell["recipe"] != recipe or spec["method"] not in methods:
            continue
        if plain != {k: v for k, v in EMULATOR_DEFAULTS.items() if k not in ("keep", "allocation")}:
            continue  # a lever (lambda, refit, k, ...), not a point of the method's keep curve
        allocation = spec.get("allocation", EMULATOR_DEFAULTS["allocation"])
        label = spec["method"] if allocation == EMULATOR_DEFAULTS["allocation"] else f"{spec['method']} {allocation}"
        record = emulators.get(slug(spec))  # the bench names an emulator's record by its spec's slug
        if record is None:
            continue
        curves.setdefault((cell["task"], label), []).append({
            "keep": spec["keep"], "keep_achieved": record["keep_achieved"], "ppl": record["perplexity"],
            "loss": mean(cell["emu_before"]), "transfer": cell["transfer"][0], "se": cell["transfer"][1]})
    for points in curves.values():
        points.sort(key=lambda q: q["keep"])
    return curves


def mean_curves(curves: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], list[dict]]:
    """Each method's curve averaged over the tasks: ``(MEAN_TASK, method)`` -> the keeps measured on
    *every* task of the folder (a keep missing on one task is left out, never filled in). Privacy is the
    emulator's (the same on every task: perplexity) or the mean held-out loss; transfer is the mean of
    the tasks' loss transfers, its ± their standard errors combined (measurement only: the tasks are
    not a sample). Empty with fewer than two tasks."""
    tasks = sorted({t for t, _ in curves})
    if len(tasks) < 2:
        return {}
    out = {}
    for method in sorted({m for _, m in curves}):
        per_task = [{q["keep"]: q for q in curves.get((t, method), [])} for t in tasks]
        points = []
        for keep in sorted(set.intersection(*(set(d) for d in per_task))):
            qs = [d[keep] for d in per_task]
            points.append({"keep": keep, "keep_achieved": qs[0]["keep_achieved"], "ppl": qs[0]["ppl"],
                           "loss": mean([q["loss"] for q in qs]), "transfer": mean([q["transfer"] for q in qs]),
                           "se": math.sqrt(sum(q["se"] ** 2 for q in qs)) / len(qs)})
        if points:
            out[(f"{MEAN_TASK} ({', '.join(tasks)})", method)] = points
    return out


def _x(point: dict, axis: str) -> float:
    return math.log(point["ppl"]) if axis == "ppl" else point["loss"]


def interpolate(curve: list[dict], x: float, axis: str) -> tuple[float, float] | None:
    """The reference curve's transfer (and a ± for it) at privacy ``x``, along the curve in keep order:
    privacy need not be monotone in keep, so where several segments reach ``x`` the best one counts (the
    owner may pick any keep). None where no segment reaches ``x``: no extrapolation."""
    best = None
    pts = sorted(curve, key=lambda q: q["keep"])
    for a, b in zip(pts, pts[1:]):
        xa, xb = _x(a, axis), _x(b, axis)
        if min(xa, xb) <= x <= max(xa, xb):
            w = 0.0 if xa == xb else (x - xa) / (xb - xa)
            value = (a["transfer"] + w * (b["transfer"] - a["transfer"]), max(a["se"], b["se"]))
            best = value if best is None or value[0] > best[0] else best
    return best


def dominance(curves: dict) -> list[dict]:
    rows = []
    for (task, method), points in sorted(curves.items()):
        ref = curves.get((task, REFERENCE))
        if method == REFERENCE or not ref:
            continue
        for q in points:
            row = {"task": task, "method": method, "keep": q["keep"], "ppl": q["ppl"], "loss": q["loss"],
                   "transfer": [q["transfer"], q["se"]]}
            for axis in PRIVACY:
                at = interpolate(ref, _x(q, axis), axis)
                row[f"{REFERENCE}_at_{axis}"] = None if at is None else [
                    at[0], at[0] - q["transfer"], math.hypot(at[1], q["se"])]
            rows.append(row)
    return rows


def accuracy_points(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        info = json.loads((Path(folder) / "results.json").read_text())
        keep, table = info["config"]["keep"], info["table"]
        for method, per_task in info.get("transfer", {}).items():
            for task, ratio in per_task.items():
                if task == "avg":
                    continue
                rows.append({"folder": folder, "method": method, "keep": keep, "task": task,
                             "emu_zs": table[f"{method}: Emu ZS"][task], "emu_ft": table[f"{method}: Emu FT"][task],
                             "plugin": table[f"{method}: Plug-in"][task], "adapter_ft": table["Adapter FT"][task],
                             "full_zs": table["Full ZS"][task], "transfer": ratio})
    return rows


def healing_points(heal_dir: Path, acc: list[dict], tasks: list[str]) -> list[dict]:
    """Per healed emulator (method, keep; calibration samples averaged) and budget: the shares of the
    random-middle reference's gap that healing left (``gradot.analysis.audit.gaps``), beside the emulator's mean
    accuracy transfer over the pipeline tasks (same method and keep). Needs ``heal.json``
    (``bench/heal.py --report-only``)."""
    report = json.loads((heal_dir / "heal.json").read_text())
    per_task: dict[tuple[str, float], dict[str, list[list[float]]]] = {}
    for r in acc:  # several folders (calibration samples) of one method, keep and task are averaged first
        per_task.setdefault((r["method"], r["keep"]), {}).setdefault(r["task"], []).append(r["transfer"])
    transfer = {key: [[mean([v[0] for v in by[t]]), math.sqrt(sum(v[1] ** 2 for v in by[t])) / len(by[t])]
                      for t in tasks] for key, by in per_task.items() if all(t in by for t in tasks)}
    groups: dict[tuple[str, float, int], list[dict]] = {}
    for label, rows in report["rows"].items():
        emulator = report["cells"].get(label, {}).get("emulator")
        if not emulator or label.startswith("sweep-"):
            continue
        for row in rows:
            groups.setdefault((emulator["method"], emulator["keep_requested"], row["tokens"]), []).append(row)
    out = []
    for (method, keep, tokens), rows in sorted(groups.items()):
        ratios = transfer.get((method, keep), [])
        point = {"method": method, "keep": keep, "tokens": tokens, "samples": len(rows),
                 "transfer": [mean([t[0] for t in ratios]), math.sqrt(sum(t[1] ** 2 for t in ratios)) / len(ratios)]
                 if ratios else None}
        for key in ("ppl_protected", "acc_protected", "ppl_gap"):
            values = [r[key] for r in rows if r.get(key) is not None]
            point[key] = mean(values) if values else None
        out.append(point)
    return out


def plot_healing(points: list[dict], path: Path) -> None:
    """Accuracy transfer against the share of the gap left after healing, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({p["tokens"] for p in points if p["transfer"] and p["ppl_protected"] is not None})
    if not budgets:
        return
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, tokens in zip(axes[0], budgets):
        for p in points:
            if p["tokens"] == tokens and p["transfer"] and p["ppl_protected"] is not None:
                ax.errorbar(p["ppl_protected"], p["transfer"][0], yerr=p["transfer"][1], marker="o", capsize=2,
                            color=COLORS.get(p["method"]))
                ax.annotate(f"{'OT†' if p['method'] == 'uniform' else p['method']} {p['keep']:g}",
                            (p["ppl_protected"], p["transfer"][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"after {tokens:,} attack tokens", fontsize=9)
        ax.set_xlabel("share of the gap left (log-ppl; 1 = shipped middle gave nothing)", fontsize=8)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[0][0].set_ylabel("accuracy transfer (mean over pipeline tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def healing_lines(points: list[dict], heal_dir: str, tasks: str) -> list[str]:
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["", "## Transfer against what healing leaves", "",
             f"Healing cells from `{heal_dir}` (bench/heal.py); transfer: mean accuracy transfer over {tasks} in the "
             "pipeline folders for the same method and keep (n/a: a task is missing). Protected: the share of the random-middle reference's "
             "gap to the original left after healing at that budget (1 = the shipped middle gave nothing).", "",
             "| method | keep | attack tokens | calib samples | ppl protected | acc protected | transfer |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        t = "n/a" if not p["transfer"] else f"{p['transfer'][0]:.2f} ± {p['transfer'][1]:.2f}"
        lines.append(f"| {p['method']} | {p['keep']:g} | {p['tokens']:,} | {p['samples']} | {fmt(p['ppl_protected'])} "
                     f"| {fmt(p['acc_protected'])} | {t} |")
    return lines + ["", "![transfer against what healing leaves](frontier-healing.png)"]


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in curves})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False, sharey="row")
    for row, task in zip(axes, tasks):
        for (t, method), pts in sorted(curves.items()):
            if t != task:
                continue
            for ax, axis in zip(row, PRIVACY):
                ax.errorbar([q[axis] for q in pts], [q["transfer"] for q in pts], yerr=[q["se"] for q in pts],
                            marker="o", capsize=2, label="OT† (uniform)" if method == "uniform" else method,
                            color=COLORS.get(method))
                for q in pts:
                    ax.annotate(f"{q['keep']:g}", (q[axis], q["transfer"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        row[0].set_xscale("log")
        for ax, axis in zip(row, PRIVACY):
            ax.set_xlabel(PRIVACY[axis] + " (higher = more private)")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        row[0].set_ylabel(f"loss transfer, {task}")
        row[1].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v) -> str:
    return "not covered" if v is None else f"{v[0]:.2f} (Δ {v[1]:+.2f} ± {v[2]:.2f})"


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = args.methods.split(",")
    recipe = parse_spec(args.recipe, RECIPE_KEYS, RECIPE_DEFAULTS, False)
    curves = loss_points(Path(args.transfer_dir) / "cells", recipe, methods)
    if not curves:
        raise SystemExit(f"no cell of recipe {args.recipe!r} in {args.transfer_dir}/cells")
    curves.update(mean_curves(curves))  # the across-task curves are compared like a task's
    dom, acc = dominance(curves), accuracy_points(args.pipelines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "bench/frontier.py", *sys.argv[1:]])
    lines = ["# Privacy-utility frontier", "", f"Command: `{command}`  ",
             f"Commit {git_commit()}; {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
             f"built from cached cells (no model loaded)  ", f"Recipe: {args.recipe} (bench/transfer.py).", "",
             "## Loss transfer per method and keep", "",
             "| task | method | keep | ppl | held-out loss | loss transfer |", "|---|---|---|---|---|---|"]
    for (task, method), pts in sorted(curves.items()):
        lines += [f"| {task} | {method} | {q['keep']:g} | {q['ppl']:,.0f} | {q['loss']:.2f} | "
                  f"{q['transfer']:.3f} ± {q['se']:.3f} |" for q in pts]
    lines += ["", f"## Is {REFERENCE} above the others at equal privacy?", "",
              f"{REFERENCE}'s transfer interpolated at each other point's privacy; Δ = {REFERENCE} − that point "
              "(positive: GradOT above).", "",
              "| task | method | keep | ppl | transfer | GradOT at its ppl | GradOT at its held-out loss |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['method']} | {r['keep']:g} | {r['ppl']:,.0f} | {r['transfer'][0]:.3f} ± "
              f"{r['transfer'][1]:.3f} | {_fmt(r[f'{REFERENCE}_at_ppl'])} | {_fmt(r[f'{REFERENCE}_at_loss'])} |"
              for r in dom]
    if acc:
        lines += ["", "## Accuracy (pipeline folders)", "",
                  "| folder | task | method | keep | Emu ZS | Emu FT | Plug-in | Adapter FT | Full ZS | transfer |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['folder']} | {r['task']} | {r['method']} | {r['keep']:g} | {r['emu_zs'][0] * 100:.1f} | "
                  f"{r['emu_ft'][0] * 100:.1f} | {r['plugin'][0] * 100:.1f} | {r['adapter_ft'][0] * 100:.1f} | "
                  f"{r['full_zs'][0] * 100:.1f} | {r['transfer'][0]:.2f} ± {r['transfer'][1]:.2f} |" for r in acc]
    plot(curves, out / "frontier.png")
    lines += ["", "![loss transfer against privacy](frontier.png)"]
    healed = healing_points(Path(args.heal), acc, args.heal_tasks.split(",")) if args.heal else []
    if healed:
        plot_healing(healed, out / "frontier-healing.png")
        lines += healing_lines(healed, args.heal, args.heal_tasks)
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    points = [{"task": t, "method": m, **q} for (t, m), pts in sorted(curves.items()) for q in pts]
    (out / "frontier.json").write_text(json.dumps({"command": command, "git_commit": git_commit(), "recipe": recipe,
                                                   "loss_points": points, "dominance": dom, "accuracy": acc,
                                                   "healing": healed},
                                                  indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
