"""Collect the federated runs of results/federated (federation.json of each run, the lm-eval JSON of
each plug-in model, the centralised baseline's manifest) into results.json and README tables.

    python bench/federated_report.py --runs /tmp/fedres --out results/federated

The runs themselves are made with the commands recorded in each federation.json (``command``) and
in the README this script writes.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from gradot.provenance import git_commit

MIB = 2**20


def _acc(path: Path, task: str = "arc_easy"):
    if not path.is_file():
        return None
    r = json.loads(path.read_text())[task]
    return {k: r[k] for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr") if k in r}


def _relative_change(adapter_dir: Path, original: dict) -> float | None:
    """||adapter - original|| / ||original|| over every adapter tensor (how far training moved it)."""
    from safetensors.numpy import load_file

    path = adapter_dir / "adapter.safetensors"
    if not path.is_file():
        return None
    a = load_file(str(path))
    num = sum(float(((a[k].astype("float64") - original[k]) ** 2).sum()) for k in a)
    den = sum(float((original[k].astype("float64") ** 2).sum()) for k in a)
    return (num / den) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--full-model-bytes", type=int, required=True, help="float32 size of the full model's weights")
    ap.add_argument("--emulator-bytes", type=int, required=True, help="size of emulator.safetensors")
    ap.add_argument("--date", required=True)
    ap.add_argument("--code-commit", required=True, help="commit the runs were made with")
    ap.add_argument("--original", required=True,
                    help="a keep-1.0 emulator folder: its adapter layers are the original model's (for the change)")
    args = ap.parse_args()
    runs = Path(args.runs)
    from safetensors.numpy import load_file

    original = load_file(str(Path(args.original) / "emulator.safetensors"))
    rows = []
    full_zs = _acc(runs / "eval-full-zs.json")
    for name in ("fed-iid", "fed-label", "fed-iid-secagg", "fed-label-secagg", "fed5-iid", "fed5-label"):
        rec_path = runs / name / "federation.json"
        if not rec_path.is_file():
            continue
        rec = json.loads(rec_path.read_text())
        rounds = rec["rounds"]
        rows.append({
            "run": name, "command": rec["command"], "clients": rec["clients"], "partition": rec["partition"],
            "alpha": rec["alpha"] if rec["partition"] == "label" else None, "secagg": rec["settings"]["secagg"],
            "rounds": len(rounds), "rounds_applied": rec["rounds_applied"],
            "seconds_per_round": [r["seconds"] for r in rounds],
            "bytes_sent_per_round": [r["bytes_sent"] for r in rounds],
            "bytes_received_per_round": [r["bytes_received"] for r in rounds],
            "client_losses_last_round": [a["train_loss"] for a in rounds[-1]["accepted"]],
            "client_train_seconds": [[a["seconds"] for a in r["accepted"]] for r in rounds],
            "adapter_bytes": rec["adapter"]["bytes"], "wall_seconds": rec["wall_seconds"],
            "plugin": _acc(runs / f"eval-{name}.json"),
            "adapter_relative_change": _relative_change(runs / name / "adapter", original),
            "label_counts": rec.get("label_counts"),
        })
    def single(name):
        if not (runs / name / "manifest.json").is_file():
            return None
        m = json.loads((runs / name / "manifest.json").read_text())["training"]
        return {"steps": m["steps"], "seconds": m["seconds"], "train_loss": m["train_loss"],
                "examples": m["examples"], "plugin": _acc(runs / f"eval-{name}.json"),
                "adapter_relative_change": _relative_change(runs / name, original)}

    central = single("central")
    adapter_ft = single("adapter-ft")

    def transfer(a):
        """(value, conservative standard error) from gradot.analysis.transfer.accuracy_transfer."""
        from gradot.analysis.transfer import accuracy_transfer

        if a is None or adapter_ft is None or adapter_ft["plugin"] is None or full_zs is None:
            return None
        if adapter_ft["plugin"]["acc"] <= full_zs["acc"]:
            return None
        pair = lambda x: (x["acc"], x["acc_stderr"])  # noqa: E731
        return list(accuracy_transfer(pair(a), pair(full_zs), pair(adapter_ft["plugin"])))

    for r in rows:
        r["transfer"] = transfer(r["plugin"])
    if central:
        central["transfer"] = transfer(central["plugin"])
    result = {"date": args.date, "code_commit": args.code_commit, "report_commit": git_commit(),
              "machine": f"{platform.machine()}, {platform.processor() or 'CPU'}; shared 2-core CPU, no GPU",
              "full_model_bytes": args.full_model_bytes, "emulator_bytes": args.emulator_bytes,
              "full_zs": full_zs, "adapter_ft": adapter_ft, "central": central, "federated": rows}
    # PIQA: 3 clients IID against one owner with all rows (300 validation questions).
    piqa = None
    if (runs / "piqa-fed-iid" / "federation.json").is_file():
        rec = json.loads((runs / "piqa-fed-iid" / "federation.json").read_text())
        piqa = {"full_zs": _acc(runs / "eval-piqa-full-zs.json", "piqa"),
                "fed_iid": {"command": rec["command"], "clients": rec["clients"],
                            "rounds_applied": rec["rounds_applied"],
                            "seconds_per_round": [r["seconds"] for r in rec["rounds"]],
                            "plugin": _acc(runs / "eval-piqa-fed-iid.json", "piqa"),
                            "adapter_relative_change": _relative_change(runs / "piqa-fed-iid" / "adapter", original)},
                "central": None, "validation_questions": 300}
        if (runs / "piqa-central" / "manifest.json").is_file():
            piqa["central"] = {"plugin": _acc(runs / "eval-piqa-central.json", "piqa"),
                               "adapter_relative_change": _relative_change(runs / "piqa-central", original)}
    result["piqa"] = piqa
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))

    def pct(a):
        return "–" if a is None else f"{100 * a['acc']:.1f} ± {100 * a['acc_stderr']:.1f}"

    def pctn(a):
        return "–" if a is None else f"{100 * a['acc_norm']:.1f} ± {100 * a['acc_norm_stderr']:.1f}"

    def tr(x):
        return "–" if x is None else f"{x[0]:.2f} ± {x[1]:.2f}"

    def ch(x):
        return "–" if x is None else f"{100 * x['adapter_relative_change']:.2f}%"

    lines = ["| setting | plug-in acc (%) | acc_norm (%) | transfer | adapter moved | rounds applied | s / round | client training s / round | sent / round | received / round |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| Full ZS (no adapter) | {pct(full_zs)} | {pctn(full_zs)} | – | – | – | – | – | – | – |"]
    if adapter_ft:
        lines.append(f"| Adapter FT (adapter layers trained on the original, {adapter_ft['steps']} steps, all {adapter_ft['examples']} rows) | "
                     f"{pct(adapter_ft['plugin'])} | {pctn(adapter_ft['plugin'])} | 1 by definition | {ch(adapter_ft)} | – | {adapter_ft['seconds']:.0f} s in all | – | – | – |")
    if central:
        lines.append(f"| one data owner with all {central['examples']} rows on the emulator ({central['steps']} steps) | "
                     f"{pct(central['plugin'])} | {pctn(central['plugin'])} | {tr(central['transfer'])} | {ch(central)} | – | {central['seconds']:.0f} s in all | – | – | – |")
    for r in rows:
        label = (f"{len(r['clients'])} clients, {r['partition']}" + (f" (alpha {r['alpha']})" if r["alpha"] else "")
                 + (", SecAgg+" if r["secagg"] else ""))
        mean_s = sum(r["seconds_per_round"]) / len(r["seconds_per_round"])
        sent = sum(r["bytes_sent_per_round"]) / len(r["bytes_sent_per_round"]) / MIB
        recv = sum(r["bytes_received_per_round"]) / len(r["bytes_received_per_round"]) / MIB
        client_s = [sum(c) / len(c) for c in r["client_train_seconds"]]
        lines.append(f"| {label} | {pct(r['plugin'])} | {pctn(r['plugin'])} | {tr(r['transfer'])} | {ch(r)} | {r['rounds_applied']}/{r['rounds']} | "
                     f"{mean_s:.0f} s | {sum(client_s) / len(client_s):.0f} s each | {sent:.1f} MiB | {recv:.1f} MiB |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
