"""Evaluation speed: the harness's own ``HFLM`` against gradot's ``FastHFLM``, in one run.

Each task's first ``--limit`` rows are scored by ``gradot.evaluation.lmeval.evaluate`` (the path of
``gradot eval`` and ``gradot pipeline``) once with ``scorer="stock"`` and once with
``scorer="fast"``, alternating which goes first, on the same loaded model. Reported per task:
log-likelihood requests, wall and CPU seconds of the scoring calls (``loglikelihood`` /
``loglikelihood_rolling``) and of the whole ``evaluate`` call (task building, tokenisation and
metrics included), requests per CPU-second, the ratio, and whether every metric (acc, acc_norm,
exact_match, perplexities) came out the same. Ratios are of CPU time: on a shared machine wall time
also measures the other jobs. One warm-up call per scorer (one row of one task) is discarded.

    OMP_NUM_THREADS=1 python bench/eval.py --threads 1 --limit 10 --out results/eval

On a GPU (used when one is visible) the GPU's work is waited for before each clock is read and the
ratios are of wall time (CPU time there measures the launching thread, not the work); a random model of
a real shape stands in where the default model cannot be loaded::

    python bench/eval.py --model random:1b --tokenizer TOKENIZER_DIR --dtype bfloat16 --limit 100 --out OUT
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

from gradot.evaluation.lmeval import EVAL_TASKS, SCORERS, evaluate
from gradot.evaluation.tasks import TASK_NAMES
from common import git_commit, gpu_sync, machine, write_markdown  # bench/ is on sys.path when a script runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default', a local model folder, a .gguf file, or random:<size> (bench/shapes.py)")
    p.add_argument("--tokenizer", default=None, help="with random:<size>: a tokenizer folder (default: the default model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help=f"comma-separated, from: {', '.join(EVAL_TASKS)}")
    p.add_argument("--limit", type=int, default=10, help="rows per task (documents for wikitext)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluate()'s batch size, the CLI's default")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results/eval")
    return p.parse_args(argv)


class Meter:
    """Requests and time inside the harness LM's scoring calls (stock and fast alike)."""

    def __init__(self):
        from lm_eval.models.huggingface import HFLM

        self.requests, self.wall, self.cpu = 0, 0.0, 0.0
        for name in ("loglikelihood", "loglikelihood_rolling"):
            setattr(HFLM, name, self._timed(getattr(HFLM, name)))

    def _timed(self, method):
        def timed(lm, requests, *args, **kwargs):
            gpu_sync()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return method(lm, requests, *args, **kwargs)
            finally:
                gpu_sync()
                self.requests += len(requests)
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
        return timed

    def reset(self):
        self.requests, self.wall, self.cpu = 0, 0.0, 0.0




def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    commit, started = git_commit(), machine()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    from shapes import load_bench_model

    model, tok = load_bench_model(args.model, args.tokenizer, dtype, device)
    clock = "wall" if device == "cuda" else "cpu"  # what the ratios divide
    meter = Meter()
    for scorer in SCORERS:  # warm-up: first-call costs (imports, dataset caches) out of the timings
        evaluate(model, tok, [tasks[0]], data_dir=args.data_dir, limit=1, batch_size=args.batch_size,
                 bootstrap_iters=0, scorer=scorer)
    rows = []
    for k, task in enumerate(tasks):
        order = SCORERS[::-1] if k % 2 else SCORERS
        row = {"task": task}
        for scorer in order:
            meter.reset()
            wall, cpu = time.perf_counter(), time.process_time()
            metrics = evaluate(model, tok, [task], data_dir=args.data_dir, limit=args.limit,
                               batch_size=args.batch_size, bootstrap_iters=0, scorer=scorer)[task]
            row[scorer] = {"metrics": metrics, "requests": meter.requests, "score_wall_s": meter.wall,
                           "score_cpu_s": meter.cpu, "evaluate_wall_s": time.perf_counter() - wall,
                           "evaluate_cpu_s": time.process_time() - cpu,
                           "requests_per_cpu_s": meter.requests / meter.cpu,
                           "requests_per_s": meter.requests / (meter.wall if clock == "wall" else meter.cpu)}
        stock, fast = row["stock"], row["fast"]
        row["speedup_scoring"] = stock[f"score_{clock}_s"] / fast[f"score_{clock}_s"]
        row["speedup_evaluate"] = stock[f"evaluate_{clock}_s"] / fast[f"evaluate_{clock}_s"]
        scored = {k: v for k, v in stock["metrics"].items() if not k.endswith("_stderr")}
        row["same_metrics"] = all(fast["metrics"].get(k) == v for k, v in scored.items())
        row["metrics_compared"] = sorted(scored)
        rows.append(row)
        print(f"{task}: {stock['requests']} requests, stock {stock[f'score_{clock}_s']:.1f} {clock}-s, fast "
              f"{fast[f'score_{clock}_s']:.1f} {clock}-s ({row['speedup_scoring']:.2f}x), same metrics: {row['same_metrics']}",
              flush=True)

    def total(scorer, key):
        return sum(r[scorer][key] for r in rows)

    summary = {
        "requests": total("stock", "requests"),
        "clock": clock,
        "speedup_scoring": total("stock", f"score_{clock}_s") / total("fast", f"score_{clock}_s"),
        "speedup_evaluate": total("stock", f"evaluate_{clock}_s") / total("fast", f"evaluate_{clock}_s"),
        "stock_requests_per_s": total("stock", "requests") / total("stock", f"score_{clock}_s"),
        "fast_requests_per_s": total("fast", "requests") / total("fast", f"score_{clock}_s"),
        "all_metrics_same": all(r["same_metrics"] for r in rows),
    }
    command = "OMP_NUM_THREADS=%s python bench/eval.py %s" % (
        os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(sys.argv[1:] if argv is None else argv))
    info = {"command": command, "git_commit": commit, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": started, "settings": vars(args), "summary": summary, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(info, indent=2))

    def metric_text(m):
        return ", ".join(f"{k} {m[k]:.4g}" for k in ("acc", "acc_norm", "exact_match", "word_perplexity") if k in m)

    lines = [
        "# Evaluation speed: stock HFLM against FastHFLM", "",
        f"Command: `{command}`  ",
        f"Commit: {commit}; date {info['date']}; machine: {started}  ",
        f"Model: {args.model} ({args.dtype} on {device}); first {args.limit} rows per task; batch size "
        f"{args.batch_size} (stock: requests per forward; fast: contexts per forward). Scoring = the harness LM's "
        f"loglikelihood calls; evaluate = the whole `evaluate()` call. Ratios of {clock.upper() if clock == 'cpu' else clock} time.", "",
        f"| task | requests | stock req/{clock}-s | fast req/{clock}-s | × scoring | × evaluate | stock wall s | fast wall s "
        "| metrics (stock) | same metrics |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, f = r["stock"], r["fast"]
        lines.append(f"| {r['task']} | {s['requests']} | {s['requests_per_s']:.2f} | {f['requests_per_s']:.2f} | "
                     f"**{r['speedup_scoring']:.2f}** | {r['speedup_evaluate']:.2f} | {s['evaluate_wall_s']:.1f} | "
                     f"{f['evaluate_wall_s']:.1f} | {metric_text(s['metrics'])} | {'yes' if r['same_metrics'] else 'NO'} |")
    lines.append(f"| all | {summary['requests']} | {summary['stock_requests_per_s']:.2f} | "
                 f"{summary['fast_requests_per_s']:.2f} | **{summary['speedup_scoring']:.2f}** | "
                 f"{summary['speedup_evaluate']:.2f} | {total('stock', 'evaluate_wall_s'):.1f} | "
                 f"{total('fast', 'evaluate_wall_s'):.1f} | | {'yes' if summary['all_metrics_same'] else 'NO'} |")
    write_markdown(out / "eval.md", lines)


if __name__ == "__main__":
    main()
