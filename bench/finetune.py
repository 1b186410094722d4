"""Fine-tuning efficiency: tokens per second and peak memory of one training step, in the four
settings of the offsite-tuning paper's efficiency table, on the default model:

* ``full``: full fine-tuning of the original model (every parameter, AdamW);
* ``full-lora``: LoRA on every decoder layer of the original model;
* ``adapter``: the adapter (bottom and top k layers) on an emulator (``--method``, ``--keep``);
* ``adapter-lora``: LoRA on the adapter layers of that emulator.

Each setting runs in its own process (clean peak memory) through the library's real training path
(``finetune_full`` / ``finetune_adapter``, i.e. transformers' Trainer with AdamW), with the same
batch size and sequence length: ``--data text``, every example exactly ``--seq-len`` tokens of
WikiText-2 text (loss on every token); ``--data pairs``, a task's training (question, answer) pairs
(``--task``, loss on the answer tokens only, batches padded to their longest example).

Each setting runs once per ``--losses`` entry, in the same run: ``stock``, the model's own loss over
full logits (before issue 12), and ``head-at-labels``, the LM head applied only at labelled positions
in chunks (``gradot.evaluation.head_loss``, the library's default).
The first ``--warmup`` steps are discarded; tokens per second are averaged over the next
``--steps`` optimizer steps (data loading, forward, backward, optimizer). Peak memory is the
process's peak resident set size while those steps ran (sampled every 5 ms), minus the resident
size after imports (so it counts model, gradients, optimizer state and activations); on CUDA,
``torch.cuda.max_memory_allocated``. One extra step afterwards counts the matmul FLOPs of a step
and the share of the LM head (a 49k vocabulary is a large part of a 135M model).

    python bench/finetune.py --keep 0.4 --threads 1 --out results/finetune
    python bench/finetune.py --keep 0.4 --threads 1 --data pairs --settings full,adapter --out results/finetune-pairs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from common import PeakRSS, git_commit, machine, table_row, write_markdown  # bench/ is on sys.path when a script runs

SETTINGS = ("full", "full-lora", "adapter", "adapter-lora")
LOSSES = ("stock", "head-at-labels")


def parse_args(argv=None):
    from gradot.methods import DEFAULT_KEEP

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="'default', a local model folder, or random:<size> (a random Llama of bench/shapes.py's "
                        "sizes: speed and memory only, e.g. on a GPU machine that cannot load the default model)")
    p.add_argument("--tokenizer", default=None,
                   help="with random:<size>: a tokenizer folder (default: the default model's tokenizer)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--losses", default=",".join(LOSSES), help="loss paths to compare, each setting with each")
    p.add_argument("--data", choices=("text", "pairs"), default="text",
                   help="text: WikiText-2 windows of exactly --seq-len tokens; pairs: --task's training pairs")
    p.add_argument("--task", default="piqa", help="with --data pairs: the task whose training pairs are used")
    p.add_argument("--method", default="uniform", help="emulator method (gradot compress --method)")
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters kept (default: the library's DEFAULT_KEEP, %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="steps discarded before timing")
    p.add_argument("--steps", type=int, default=4, help="timed steps")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Trainer's bf16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results/finetune")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--loss", default="head-at-labels", help=argparse.SUPPRESS)
    p.add_argument("--emulator", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# worker: one setting, in its own process


def _records(tok, n_examples: int, seq_len: int) -> list[str]:
    """Texts of WikiText-2 that tokenize to exactly ``seq_len`` tokens each (one full window)."""
    from gradot.stats.calib import default_calibration_path, read_corpus

    text = read_corpus(default_calibration_path())
    ids = tok(text[: n_examples * seq_len * 16], add_special_tokens=False)["input_ids"]
    records = []
    for start in range(0, len(ids) - seq_len, seq_len):
        piece = tok.decode(ids[start:start + seq_len])
        if len(tok(piece)["input_ids"]) == seq_len:  # re-tokenizing a cut can merge or split a token
            records.append(piece)
        if len(records) == n_examples:
            return records
    raise SystemExit("not enough calibration text for the requested steps")


def worker(args) -> dict:
    import psutil

    import torch
    import peft  # noqa: F401  (same imports in every setting: same baseline)
    from transformers import TrainerCallback

    from gradot.artifacts import load_emulator, load_emulator_tokenizer
    from gradot.finetune import FinetuneConfig, FinetuneDataset, finetune_adapter, finetune_full
    from gradot.evaluation.head_loss import HeadAtLabels
    from gradot.modeling import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    baseline = psutil.Process().memory_info().rss
    setting = args.worker
    if setting.startswith("full"):
        model, tok = load_model(args.model, device="cuda" if cuda else "cpu")
        emulator = None
    else:
        emulator = load_emulator(args.emulator, device="cuda" if cuda else "cpu")
        tok = load_emulator_tokenizer(args.emulator)
        model = emulator.model
    total_steps = args.warmup + args.steps + 1  # + one step whose FLOPs are counted
    if args.data == "pairs":
        from gradot.finetune import task_records
        from gradot.evaluation.tasks import load_task

        records = task_records(load_task(args.task, "train", limit=total_steps * args.batch_size))
        data = FinetuneDataset(tok, records, args.seq_len)
    else:
        records = _records(tok, total_steps * args.batch_size, args.seq_len)
        data = FinetuneDataset(tok, records, args.seq_len)
        assert len(data) == len(records) and all(len(ids) == args.seq_len for ids, _ in data.examples)
    assert len(data) == total_steps * args.batch_size
    after_load = psutil.Process().memory_info().rss
    rss = PeakRSS()

    class Meter(TrainerCallback):
        def __init__(self):
            self.ends, self.cpu, self.seen, self.flops = [], [], [], None
            self.counter = None

        def on_step_begin(self, a, state, control, **kw):
            step = state.global_step  # 0-based index of the step about to run
            if step == args.warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                rss.start()
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())
                self.seen.append(state.num_input_tokens_seen)
            # torch's FLOP counter rejects CUDA SDPA with grouped KV heads: count on the CPU only
            # (the count does not depend on the machine).
            if step == args.warmup + args.steps and not cuda:
                from torch.utils.flop_counter import FlopCounterMode

                self.counter = FlopCounterMode(display=False)
                self.flops_tokens = state.num_input_tokens_seen
                self.counter.__enter__()

        def on_step_end(self, a, state, control, **kw):
            step = state.global_step  # steps done
            if args.warmup < step <= args.warmup + args.steps:
                if cuda:
                    torch.cuda.synchronize()
                self.ends.append(time.perf_counter())
                self.cpu.append(time.process_time())
                self.seen.append(state.num_input_tokens_seen)
                if step == args.warmup + args.steps:
                    rss.stop()
            if self.counter is not None and step == total_steps:
                self.counter.__exit__(None, None, None)
                self.flops_tokens = state.num_input_tokens_seen - self.flops_tokens  # non-padding tokens
                counts = self.counter.get_flop_counts()
                total = self.counter.get_total_flops()
                head = max((sum(v.values()) for k, v in counts.items() if k.endswith("lm_head")), default=0)
                # head-at-labels runs the head's matmuls in the loss, outside the lm_head module
                self.flops = {"total": total, "lm_head": head + self.loss_flops}

    meter = Meter()
    meter.loss_flops = 0
    real_loss = HeadAtLabels.loss

    def counted_loss(self, *a, **kw):  # the FLOPs of the head-at-labels loss, counted apart
        if meter.counter is None:
            return real_loss(self, *a, **kw)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as inner:  # nested: the outer counter sees them too
            out = real_loss(self, *a, **kw)
        meter.loss_flops += inner.get_total_flops()
        return out

    HeadAtLabels.loss = counted_loss
    with tempfile.TemporaryDirectory(prefix="gradot-ftbench-") as out:
        cfg = FinetuneConfig(output_dir=out, max_steps=total_steps, batch_size=args.batch_size,
                             max_length=args.seq_len, lora_r=args.lora_r if setting.endswith("lora") else 0,
                             logging_steps=1000, save_steps=100000, save_total_limit=1, bf16=args.bf16,
                             learning_rate=1e-5, head_at_labels=args.loss == "head-at-labels")
        if emulator is None:
            _, stats = finetune_full(model, tok, records, cfg, callbacks=[meter])
        else:
            _, stats = finetune_adapter(emulator, tok, records, cfg, callbacks=[meter])
    seconds = meter.ends[-1] - meter.ends[0]
    cpu_seconds = meter.cpu[-1] - meter.cpu[0]
    tokens = meter.seen[-1] - meter.seen[0]
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    result = {
        "setting": setting, "loss": args.loss, "params": params, "lm_head_params": head,
        "trainable_parameters": stats["trainable_parameters"],
        "timed_steps": args.steps, "seconds": seconds, "seconds_per_step": seconds / args.steps,
        "tokens": tokens, "tokens_per_second": tokens / seconds,
        "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": tokens / cpu_seconds,
        "baseline_rss_mib": baseline / 2**20, "loaded_rss_mib": after_load / 2**20,
        "peak_rss_mib": rss.peak / 2**20, "peak_mib": (rss.peak - baseline) / 2**20,
        "flops_per_token": meter.flops["total"] / meter.flops_tokens if meter.flops else None,
        "lm_head_flop_share": meter.flops["lm_head"] / meter.flops["total"] if meter.flops else None,
        "final_loss": stats.get("train_loss"),
    }
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_memory_source"] = "cuda max_memory_allocated"
    return result


# ---------------------------------------------------------------------------------------------
# driver




def make_emulator(args, folder: Path) -> dict:
    from gradot.artifacts import save_emulator
    from gradot.methods import compress
    from gradot.modeling import load_model

    model, tok = load_model(args.model)
    options = dict(adapter_layers=2, calib=None, calib_sequences=8, calib_len=128, batch_size=4,
                   allocation="uniform")  # the rest: each method's defaults (λ 0, top_frac 0.05)
    emu = compress(model, tok, args.method, args.keep, options)
    save_emulator(emu, folder, overwrite=True, tokenizer=tok)
    return emu.manifest["size"]


def save_random_model(spec: str, tokenizer: str | None, folder: Path) -> None:
    """``random:<size>``: a random Llama of that shape saved with a real tokenizer (workers load it)."""
    from shapes import random_llama  # bench/shapes.py (the script's folder is on sys.path)
    from transformers import AutoTokenizer

    from gradot.modeling import load_model

    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else load_model("default")[1]
    model = random_llama(spec.split(":", 1)[1])
    if len(tok) > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary {model.config.vocab_size}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    started = machine(threads=args.threads)
    commit = git_commit()  # at the start: the code that runs, whatever changes meanwhile
    tmp = tempfile.TemporaryDirectory(prefix="gradot-ftbench-emu-")  # the emulator only lives for the run
    model_arg = args.model
    if args.model.startswith("random:"):
        args.model = str(Path(tmp.name) / "model")
        save_random_model(model_arg, args.tokenizer, Path(args.model))
    emu_dir = Path(tmp.name) / f"emulator-{args.method}-keep{args.keep}"
    size = make_emulator(args, emu_dir) if any(s.startswith("adapter") for s in settings) else None
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    if set(losses) - set(LOSSES):
        raise SystemExit(f"--losses: unknown {sorted(set(losses) - set(LOSSES))}; known: {', '.join(LOSSES)}")
    rows = []
    for setting, loss in [(s, l) for s in settings for l in losses]:
        cmd = [sys.executable, __file__, "--worker", setting, "--loss", loss, "--emulator", str(emu_dir),
               "--model", args.model, "--data", args.data, "--task", args.task,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.bf16:
            cmd.append("--bf16")
        print(f"== {setting}, {loss} loss ==", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"setting {setting} failed (exit {proc.returncode})")
        row = json.loads(found[-1][len("RESULT "):])
        rows.append(row)
        print(f"  {row['tokens_per_second']:.0f} tokens/s, {row['tokens_per_cpu_second']:.0f} tokens/CPU-s, "
              f"{row['seconds_per_step']:.2f} s/step, "
              f"peak {row['peak_mib']:.0f} MiB", flush=True)
    tmp.cleanup()
    # On a shared CPU, wall time depends on what else runs; the process's CPU time much less.
    speed = "tokens_per_second" if any("peak_memory_source" in r for r in rows) else "tokens_per_cpu_second"

    def find(setting, loss):
        return next((r for r in rows if r["setting"] == setting and r["loss"] == loss), None)

    for r in rows:
        for key, other in (("vs_full", find("full", r["loss"])), ("vs_stock", find(r["setting"], "stock")),
                           ("vs_full_stock", find("full", "stock"))):
            if other:
                r["speed_" + key] = r[speed] / other[speed]
                r["memory_" + key] = r["peak_mib"] / other["peak_mib"]

    command = "python bench/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {"command": command, "git_commit": commit,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": started,
            "settings": {**vars(args), "model": model_arg}, "emulator_size": size, "speed_ratios_of": speed,
            "rows": rows}
    (out / "finetune.json").write_text(json.dumps(info, indent=2))
    emu_note = ""
    if size:
        emu_note = (f"Emulator: {args.method}, keep {args.keep} (achieved {size['keep_achieved']:.3f}), "
                    f"{size['emulator_params'] / 1e6:.1f} M parameters, depth {size['emulator_depth']}.  ")
    lines = [
        "# Fine-tuning efficiency", "",
        f"Command: `{command}`  ",
        f"Commit: {info['git_commit']}; date {info['date']}; machine: {started}  ",
        f"Model: {model_arg}; "
        + (f"batch {args.batch_size} × {args.seq_len} tokens of text (loss on every token)" if args.data == "text"
           else f"batch {args.batch_size} {args.task} training pairs (loss on answer tokens; up to {args.seq_len} "
                "tokens, padded to the batch's longest; tokens/s counts non-padding tokens)")
        + "; AdamW through transformers' Trainer; "
        f"LoRA rank {args.lora_r}; {args.warmup} warm-up steps, {args.steps} timed steps"
        + ("; bf16" if args.bf16 else "; float32") + ".  ",
        emu_note,
        "Peak memory: process peak RSS during the timed steps minus RSS after imports (CPU), or CUDA "
        "max_memory_allocated. Ratios: against full FT with the same loss, and against the same setting "
        "with the stock (full-logits) loss; speed ratios of "
        + ("tokens per CPU-second (the process's CPU time: on a shared machine, wall time also measures the "
           "other jobs)." if speed == "tokens_per_cpu_second" else "tokens per second."), "",
        "| setting | loss | trainable | tokens/s | tokens/CPU-s | × full FT | × stock loss | s/step | peak MiB "
        "| × full FT | × stock loss | matmul GFLOP/token | LM head share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def ratio(r, key):
        return f"{r[key]:.2f}" if key in r else "–"

    for r in rows:
        fl = f"{r['flops_per_token'] / 1e9:.2f}" if r["flops_per_token"] else "–"
        share = f"{r['lm_head_flop_share']:.0%}" if r["lm_head_flop_share"] is not None else "–"
        lines.append(table_row([
            r["setting"], r["loss"], f"{r['trainable_parameters'] / 1e6:.2f} M", f"{r['tokens_per_second']:.0f}",
            f"{r['tokens_per_cpu_second']:.0f}", ratio(r, "speed_vs_full"), ratio(r, "speed_vs_stock"),
            f"{r['seconds_per_step']:.2f}", f"{r['peak_mib']:.0f}", ratio(r, "memory_vs_full"),
            ratio(r, "memory_vs_stock"), fl, share]))
    write_markdown(out / "finetune.md", lines)


if __name__ == "__main__":
    main()
