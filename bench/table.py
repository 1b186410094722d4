"""One results table over several ``gradot pipeline`` folders (loads no model, computes no cell).

Some tasks cost too much to score in full on this CPU and run in folders of their own with a
``--limit`` (HellaSwag's first 500 questions, RACE's first 200 passages), so no single folder holds
the eight-task table. This script gathers the cells of every folder given, in order; a task already
taken from an earlier folder is not taken again (said on stdout and in the note), so each column
comes whole from one folder and its own settings. It writes ``results.json`` and ``results.md`` with
the pipeline's own table code (rows, Δ, ``avg`` and the transfer ratio), plus each column's source
folder and question count.

    python bench/table.py results/pipeline-keep0.7-lr3e-4 results/pipeline-keep0.7-lr3e-4-limit500 \\
        results/pipeline-keep0.7-lr3e-4-race200 --out results/table-keep0.7-lr3e-4
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from common import git_commit  # bench/ is on sys.path when a script runs
from gradot.pipeline import folder_cells
from gradot.pipeline_report import markdown_table, tables
from gradot.evaluation.tasks import TASK_NAMES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="pipeline output folders; the first holding a task supplies it")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def gather(folders: list[Path]) -> tuple[dict[str, dict[str, dict]], dict[str, Path], list[str]]:
    """``(cells, source, methods)``: ``{row: {task: cell}}`` from the folders, the folder each task
    came from, and the methods seen (in first-seen order)."""
    cells: dict[str, dict[str, dict]] = {}
    source: dict[str, Path] = {}
    methods: list[str] = []
    for folder in folders:
        if not (folder / "cells").is_dir():
            raise SystemExit(f"{folder}: not a pipeline folder (no cells/)")
        found = list(folder_cells(folder / "cells"))
        for row, task, cell in found:
            if source.setdefault(task, folder) != folder:
                continue
            cells.setdefault(row, {})[task] = cell
            method = row.split(": ", 1)[0] if ": " in row else None
            if method and method not in methods:
                methods.append(method)
        skipped = sorted({t for _, t, _ in found if source[t] != folder})
        if skipped:
            print(f"{folder}: {', '.join(skipped)} already taken from an earlier folder, not taken again")
    return cells, source, methods


def main(argv=None):
    args = parse_args(argv)
    cells, source, methods = gather(args.folders)
    tasks = sorted(source, key=list(TASK_NAMES).index)  # the CLI's task order, whatever folder a task came from
    count = {t: next((c["n"] for row in cells.values() if (c := row.get(t)) and "n" in c), None) for t in tasks}
    info = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} (no model loaded: cells gathered from the folders below)",
        "sources": {t: {"folder": str(source[t]), "questions": count[t]} for t in tasks},
        **tables(cells, tasks, methods),
        "cells": cells,
    }
    note = "cells gathered from pipeline folders, each column from one folder: " + "; ".join(
        f"{t} from `{source[t]}` ({count[t]} questions)" for t in tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(info, indent=1))
    (args.out / "results.md").write_text(markdown_table(info, tasks, note=note))
    print(f"results: {args.out / 'results.md'}, results.json")


if __name__ == "__main__":
    main()
