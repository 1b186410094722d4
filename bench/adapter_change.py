"""How far honest fine-tuning moves adapter tensors: the measurement behind the default bound on
plug-in (``gradot.artifacts.DEFAULT_MAX_CHANGE``, ``--max-change``).

For each adapter folder given (written by ``gradot finetune`` on an emulator of ``--model``), the
relative change ``||new - original|| / ||original||`` of every adapter tensor against the model's
own layers, the largest per adapter and which tensor it is. Writes JSON and Markdown to ``--out``.

    python bench/adapter_change.py --model default --adapters ADAPTER_DIR... --out results/adapter-change
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from common import git_commit, machine, table_row, write_markdown
from safetensors import safe_open

from gradot.artifacts import DEFAULT_MAX_CHANGE, read_manifest, relative_change
from gradot.modeling import load_model
from gradot.split import Split, adapter_state_dict


def changes(model, folder: Path) -> dict:
    manifest = read_manifest(folder, "adapter")
    split = Split(manifest["base"]["num_layers"], manifest["adapter"]["k"])
    own = adapter_state_dict(model, split.adapter)
    with safe_open(str(folder / "adapter.safetensors"), framework="pt") as f:
        per_tensor = {name: relative_change(f.get_tensor(name), own[name]) for name in f.keys()}
    worst = max(per_tensor, key=per_tensor.get)
    kinds: dict[str, list[float]] = {}
    for name, ratio in per_tensor.items():
        kinds.setdefault(name.rsplit(".", 2)[-2], []).append(ratio)
    return {"adapter": str(folder), "training": manifest.get("training", {}), "max_change": per_tensor[worst],
            "max_tensor": worst, "median_change": sorted(per_tensor.values())[len(per_tensor) // 2],
            "max_by_kind": {k: max(v) for k, v in sorted(kinds.items())}, "per_tensor": per_tensor}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--adapters", nargs="+", required=True)
    p.add_argument("--out", default="results/adapter-change")
    p.add_argument("--note", default="", help="how the adapters were made (the commands), for the report")
    args = p.parse_args()
    model, _ = load_model(args.model)
    rows = [changes(model, Path(folder)) for folder in args.adapters]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + shlex.join(sys.argv), "commit": git_commit(), "machine": machine(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model, "default_bound": DEFAULT_MAX_CHANGE,
            "note": args.note}
    (out / "adapter_change.json").write_text(json.dumps({**meta, "adapters": rows}, indent=1))
    lines = ["# How far honest fine-tuning moves adapter tensors", "",
             "Command:", "", "```", meta["command"], "```", "", f"Commit: {meta['commit']}; date {meta['date']}; machine: {meta['machine']}  ",
             f"Model: {args.model}. Relative change ‖new − original‖ / ‖original‖ of each adapter tensor against the "
             f"model's own layer; the default plug-in bound is {DEFAULT_MAX_CHANGE:g}.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| adapter | task | lr | steps | largest change | tensor | median | largest per kind |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["training"]
        cfg = t.get("config", {}) if isinstance(t.get("config"), dict) else {}
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["max_by_kind"].items())
        lines.append(table_row([Path(r["adapter"]).name, cfg.get("task", t.get("task", "?")),
                                t.get("learning_rate", cfg.get("learning_rate", "?")), t.get("steps", "?"),
                                f"{r['max_change']:.4f}", r["max_tensor"], f"{r['median_change']:.4f}", kinds]))
    write_markdown(out / "adapter_change.md", lines)


if __name__ == "__main__":
    main()
