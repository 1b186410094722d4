"""The pipeline's report: the results table (accuracy ± standard error per row and task, Δ rows, an
``avg`` column), the transfer table, written as ``results.json``, ``results.md`` and ``results.png``."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from .provenance import git_commit
from .analysis.transfer import accuracy_transfer


def _metric(result: dict[str, float]) -> tuple[str, float, float]:
    """The table's metric for a task: accuracy for multiple choice, exact match for WebQuestions."""
    for name in ("acc", "exact_match"):
        if name in result:
            return name, result[name], result.get(f"{name}_stderr", float("nan"))
    raise KeyError(f"no accuracy metric in {sorted(result)}")


def write_report(out: Path, cfg, cells: dict[str, dict[str, dict]]) -> dict:
    """``results.json``, ``results.md`` and ``results.png`` in ``out`` from the cells of a run with
    ``cfg`` (a ``pipeline.PipelineConfig``); the JSON's content."""
    info = {
        "command": cfg.command,
        "git_commit": git_commit(mark_uncommitted=False),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "config": asdict(cfg),
        **tables(cells, cfg.tasks, cfg.methods),
        "cells": cells,
    }
    (out / "results.json").write_text(json.dumps(info, indent=1))
    (out / "results.md").write_text(markdown_table(info, cfg.tasks))
    plot(info["table"], cfg, out / "results.png", transfer=info["transfer"])
    return info


def tables(cells: dict[str, dict[str, dict]], tasks: list[str], methods: list[str]) -> dict:
    """The report's figures from the cells, JSON-ready: ``metric``, ``table`` (accuracy or exact match
    ± standard error, Δ rows, ``avg``), ``table_acc_norm`` and ``transfer``."""
    table = build_table(cells, tasks, methods, lambda r: _metric(r)[1:])
    norm = build_table(cells, tasks, methods,
                       lambda r: (r["acc_norm"], r.get("acc_norm_stderr", float("nan"))) if "acc_norm" in r else None)
    return {
        "metric": "acc (multiple choice), exact_match (webquestions); ± is the standard error",
        "table": {r: {t: list(v) for t, v in row.items()} for r, row in table.items()},
        "table_acc_norm": {r: {t: list(v) for t, v in row.items()} for r, row in norm.items() if row},
        "transfer": {m: {t: list(v) for t, v in row.items()} for m, row in transfer_table(table, tasks, methods).items()},
    }


#: Row names by cell-file key, in the published order: the original's rows, then each method's.
ORIGINAL_ROWS = {"full_zs": "Full ZS", "full_ft": "Full FT", "adapter_ft": "Adapter FT"}
METHOD_ROWS = {"emu_zs": "Emu ZS", "emu_ft": "Emu FT", "plugin": "Plug-in"}


def build_table(cells: dict[str, dict[str, dict]], tasks: list[str], methods: list[str], pick) -> dict:
    """``{row: {task: (value, stderr)}}`` from the cells, ``pick(result)`` choosing the metric (None:
    the task has none), plus a Δ row per method and an ``avg`` column where every task has a value."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    # Rows in the published order whatever order the cells were found in (a folder's files sort emu_ft first).
    order = [*ORIGINAL_ROWS.values(), *(f"{m}: {r}" for m in methods for r in METHOD_ROWS.values())]
    for row in [r for r in order if r in cells] + [r for r in cells if r not in order]:
        table[row] = {t: v for t, r in cells[row].items() if (v := pick(r)) is not None}
    for method in methods:
        ft, pl = table.get(f"{method}: Emu FT", {}), table.get(f"{method}: Plug-in", {})
        table[f"{method}: Δ"] = {
            t: (pl[t][0] - ft[t][0], math.hypot(pl[t][1], ft[t][1])) for t in tasks if t in ft and t in pl
        }
    for row in table.values():
        if row and len(row) == len(tasks):
            row["avg"] = (sum(v[0] for v in row.values()) / len(tasks),
                          math.sqrt(sum(v[1] ** 2 for v in row.values())) / len(tasks))
    return table


def transfer_table(table: dict, tasks: list[str], methods: list[str]) -> dict:
    """``{method: {task: (transfer, stderr)}}``: (Plug-in − Full ZS) / (Adapter FT − Full ZS).

    The ``avg`` column is the ratio of the averages (average gain of the plug-in over average gain of
    Adapter FT), not the average of ratios: a task where Adapter FT gains nothing would make its
    own ratio meaningless and swamp a mean of ratios.
    """
    zs, ceiling = table.get("Full ZS", {}), table.get("Adapter FT", {})
    out = {}
    for method in methods:
        plug = table.get(f"{method}: Plug-in", {})
        out[method] = {t: accuracy_transfer(plug[t], zs[t], ceiling[t])
                       for t in [*tasks, "avg"] if t in plug and t in zs and t in ceiling}
    return {m: row for m, row in out.items() if row}


FOLDER_NOTE = ("the table covers every cell in the folder: other tasks and methods come from earlier commands "
               "with the same settings, `settings.json`")


def markdown_table(info: dict, tasks: list[str], note: str = FOLDER_NOTE) -> str:
    """``results.md``'s text; ``note`` says where the cells come from (one folder unless told)."""
    cols = tasks + ["avg"]
    lines = [
        "# Offsite-tuning results", "",
        f"Command: `{info['command']}` ({note})  ",
        f"Commit {info['git_commit']}; {info['date']}; {info['machine']}  ",
        f"Metric: {info['metric']}. Δ = Plug-in − Emu FT.", "",
    ]
    lines += _table_lines(info["table"], cols)
    if info.get("transfer"):
        lines += ["", "Transfer = (Plug-in − Full ZS) / (Adapter FT − Full ZS): the share of the gain of training the "
                  "adapter layers on the original that the emulator-trained adapter carries (1 = all of it). "
                  "avg: ratio of the average gains. ± from the three scores' standard errors, taken as "
                  "independent (conservative: they are measured on the same questions).", ""]
        lines += ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method, row in info["transfer"].items():
            lines.append(f"| {method} | " + " | ".join(
                f"{row[c][0]:.2f} ± {row[c][1]:.2f}" if c in row and not math.isnan(row[c][0])
                else ("no gain" if c in row else "–") for c in cols) + " |")
        if any(math.isnan(v[0]) for row in info["transfer"].values() for v in row.values()):
            lines += ["", "no gain: Adapter FT scored the same as Full ZS there; there is nothing to transfer."]
    if info.get("table_acc_norm"):
        lines += ["", "acc_norm (length-normalised log-likelihood), where the harness reports it:", ""]
        lines += _table_lines(info["table_acc_norm"], cols)
    lines += ["", "Cost per cell: seconds per evaluated example; for fine-tuned rows also seconds per training "
              "step (batch of the settings above) and the mean training loss over the run.", ""]
    lines += ["| row | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row, per_task in info["cells"].items():
        out = []
        for t in tasks:
            r = per_task.get(t)
            if r is None:
                out.append("–")
                continue
            text = f"{r.get('seconds_per_example', float('nan')):.3f} s/ex"
            training = r.get("training") or {}
            if training.get("seconds_per_step"):
                text += f", {training['seconds_per_step']:.2f} s/step, loss {training.get('train_loss', float('nan')):.2f}"
            out.append(text)
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def _table_lines(table: dict, cols: list[str]) -> list[str]:
    lines = ["| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, values in table.items():
        cells = [f"{100 * values[c][0]:.1f} ± {100 * values[c][1]:.1f}" if c in values else "–" for c in cols]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def plot(table: dict, cfg, path: Path, transfer: dict | None = None) -> None:
    """Per-task bars of Emu ZS / Emu FT / Plug-in (per method) next to Full ZS / Full FT / Adapter FT;
    below, where there is an Adapter FT row, each method's transfer per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if not r.endswith("Δ")]
    width_in = max(6, 1.8 * len(cfg.tasks) * max(1, len(rows)) / 4)
    if transfer:
        fig, (ax, tax) = plt.subplots(2, 1, figsize=(width_in, 7), gridspec_kw={"height_ratios": [4, 2]})
    else:
        fig, ax = plt.subplots(figsize=(width_in, 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [t + i * width for t in range(len(cfg.tasks))]
        ys = [100 * table[row].get(task, (float("nan"), 0))[0] for task in cfg.tasks]
        es = [100 * table[row].get(task, (0, 0))[1] for task in cfg.tasks]
        ax.bar(xs, ys, width, yerr=es, label=row, capsize=2)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(cfg.tasks))], cfg.tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{cfg.model}, keep {cfg.keep}")
    # Below the axes: inside them the legend hid the tallest bars.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    if transfer:
        _plot_transfer(tax, transfer, [*cfg.tasks, "avg"], no_gain_columns(table, [*cfg.tasks, "avg"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


#: The transfer panel's range: a task with almost no gain has a wild ratio; values beyond are marked.
TRANSFER_RANGE = (-0.5, 1.5)


def no_gain_columns(table: dict, cols: list[str]) -> set[str]:
    """Columns where Adapter FT does not beat Full ZS by more than the standard error of their
    difference: there is no gain to transfer, and a ratio would be noise over noise."""
    zs, ceiling = table.get("Full ZS", {}), table.get("Adapter FT", {})
    return {c for c in cols if c in zs and c in ceiling
            and ceiling[c][0] - zs[c][0] <= math.hypot(ceiling[c][1], zs[c][1])}


def _plot_transfer(ax, transfer: dict, cols: list[str], no_gain: set[str]) -> None:
    """Each method's transfer per column: a bar and a dot at its value (a 0.0 stays visible), the
    error bar clipped to the panel, an arrow and the number where the value lies outside the panel's
    range, and "no gain to transfer" instead of a bar where Adapter FT did not beat Full ZS."""
    low, high = TRANSFER_RANGE
    tw = 0.8 / len(transfer)
    for i, (method, row) in enumerate(transfer.items()):
        color = f"C{i}"
        for j, col in enumerate(cols):
            x = j + i * tw
            if col in no_gain or col not in row or math.isnan(row[col][0]):
                continue
            value, err = row[col]
            shown = min(max(value, low), high)
            ax.bar(x, shown, tw, color=color, alpha=0.8)
            ax.errorbar(x, shown, yerr=[[min(err, shown - low)], [min(err, high - shown)]], color="black",
                        lw=0.8, capsize=2)
            ax.plot(x, shown, "o", color="black", ms=2.5)
            if value != shown:  # outside the range: an arrow at the edge and the value
                ax.annotate(f"{value:.1f}", (x, shown), xytext=(0, 6 if value > high else -12),
                            textcoords="offset points", ha="center", fontsize=6)
                ax.plot(x, shown, "^" if value > high else "v", color=color, ms=6, mec="black", mew=0.5)
        ax.bar([], [], color=color, label=method)  # a legend entry per method
    for j, col in enumerate(cols):
        if col in no_gain:
            ax.text(j + 0.4 - tw / 2, (low + high) / 2, "no gain\nto transfer", ha="center", va="center",
                    fontsize=7, color="dimgrey")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xticks([t + 0.4 - tw / 2 for t in range(len(cols))], cols)
    ax.set_ylabel("transfer")
    ax.set_ylim(low - 0.1, high + 0.1)  # room for the arrows at the edges
    # Below the axes, as the accuracy panel's: inside them it hid bars and error bars.
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
