"""Cheap, low-noise transfer bench: does an adapter trained on the emulator help the full model?

Per (emulator, recipe, task) cell: train the adapter layers N steps on the emulator and, on the same
batches in the same order, directly on the original ("Adapter FT", cached per recipe and task); then
measure on held-back training rows (never trained on, not the validation set) the *original*
model's answer-token loss with the plugged adapter. Loss transfer = (base − plugged) / (base −
direct), paired per row, ± its delta-method standard error. Also per cell: the emulator's own
held-out loss before and after training (cheap stand-ins for Emu ZS and Emu FT), and the
adapter-gradient cosine at the start (the older proxy); per emulator: achieved keep, WikiText-2 test
token perplexity (privacy), compression seconds.

An emulator is ``METHOD:key=value,...`` (keys: keep, allocation, lambda, calib, calib_len, refit,
ridge, k, layer_drop: GradOT with that share of middle layers dropped whole first, kfac_tokens / kfac_bf16:
GradOT's KFAC products over that share of the tokens / in bfloat16 (1), damping: GradOT's factors damped by δ·mean
eigenvalue before scoring, calib_skip: calibration from the
next sequences (another sample of the same size), calib_data: ``+``-joined tasks whose train rows replace WikiText as calibration, answer loss;
for the trained methods distill and scaleot also distill_steps and init); a recipe is ``key=value,...`` (keys: lr, steps, lora, pull, loss, train; ``train=top`` or
``train=bottom`` trains only that half of the adapter on both sides, the other half stays the original's). Keys not
named take the library's defaults (keep ``DEFAULT_KEEP``, the method configs' options, lr ``TASK_LR``); the
method's config checks the values. Cells live in a ``gradot.cells.CellStore`` as the pipeline's do: one JSON
file per finished cell under ``OUT/cells`` (emulators under ``OUT/emulators``), ``OUT/settings.json``
recording what every cell depends on; a rerun resumes, and ``--report-only`` rebuilds ``OUT/transfer.md`` /
``transfer.json`` from the cells there are.

    OMP_NUM_THREADS=1 python bench/transfer.py --out results/transfer \\
        --emulators uniform gradot gradot:keep=0.55 --recipes steps=30 --tasks arc_easy,sciq
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainerCallback

from gradot.artifacts import load_emulator, save_emulator
from gradot.cells import CellStore, claim_folder
from gradot.methods import DEFAULT_KEEP, get, make_config, method_options
from gradot.methods.uniform import uniform_emulator
from gradot.stats.calib import CalibrationSpec, calibration_batches, default_calibration_path
from gradot.analysis.compensate import compensate
from gradot.emulator import Emulator
from gradot.errors import GradotError
from gradot.finetune import TASK_LR, FinetuneConfig, finetune_adapter, task_records
from gradot.modeling import load_model
from gradot.analysis.proxy import adapter_gradients, cosines, encode_pairs, mean_and_stderr, perplexity
from gradot.split import adapter_state_dict, split_model
from gradot.evaluation.tasks import load_task, resolve_data_dir
from gradot.analysis.transfer import answer_losses, loss_transfer
from common import git_commit  # bench/ is on sys.path when a script runs

def _option_default(name: str):
    """A method option's default, as the method registry declares it."""
    return method_options()[name][0].default


def _option_kind(name: str):
    return method_options()[name][0].metadata["kind"]


#: Emulator keys that are method options: bench key -> the registry's option (``lambda`` sets both
#: λs). Their types and defaults come from the method configs; ``make_config`` checks their values.
METHOD_OPTION_KEYS = {"allocation": "allocation", "lambda": "lambda_attn", "layer_drop": "layer_drop",
                      "damping": "damping", "kfac_tokens": "kfac_tokens", "distill_steps": "distill_steps",
                      "init": "init"}
EMULATOR_KEYS = {"keep": float, **{k: _option_kind(o) for k, o in METHOD_OPTION_KEYS.items()},
                 # the bench's own: calibration size (sequences, tokens each), the split, compensation
                 "calib": int, "calib_len": int, "refit": str, "ridge": float, "k": int, "calib_data": str,
                 # GradOT's bfloat16 KFAC products, as 1 (an int, so cell names stay as they were)
                 "kfac_bf16": int,
                 # another calibration sample of the same size: skip this many WikiText sequences first
                 "calib_skip": int}
#: The library's defaults (keep, allocation, λ) and the CLI's calibration and split. Keys without a
#: default (layer_drop, damping, ...) enter a spec only when named, so other cells keep their names.
EMULATOR_DEFAULTS = {"keep": DEFAULT_KEEP, "allocation": _option_default("allocation"),
                     "lambda": _option_default("lambda_attn"), "calib": 32, "calib_len": 256,
                     "refit": "none", "ridge": 1e-2, "k": 2}
RECIPE_KEYS = {"lr": float, "steps": int, "lora": int, "pull": float, "loss": str, "train": str}
#: The data owner's default learning rate is the library's (``TASK_LR``, the same for every task).
RECIPE_DEFAULTS = {"lr": TASK_LR["default"], "steps": 40, "lora": 0, "pull": 0.0, "loss": "answer"}
#: The defaults the cell and emulator names were first written against: a name lists the settings
#: that differ from these, so it stays the same whatever the defaults above become (cached cells are
#: found again). Labels in the report use them too, so a label always means the same settings.
NAME_DEFAULTS = {"keep": 0.4, "allocation": "global", "lambda": 0.0, "calib": 32, "calib_len": 256,
                 "refit": "none", "ridge": 1e-2, "k": 2, "lr": 1e-4, "steps": 40, "lora": 0, "pull": 0.0,
                 "loss": "answer"}


def parse_spec(text: str, keys: dict, defaults: dict, with_method: bool) -> dict:
    spec = dict(defaults)
    body = text
    if with_method:
        method, _, body = text.partition(":")
        spec["method"] = method
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise SystemExit(f"bad spec item {item!r} in {text!r} (keys: {', '.join(keys)})")
        spec[key] = keys[key](value)
    if not with_method and spec["loss"] not in ("answer", "all"):
        raise SystemExit(f"loss must be 'answer' or 'all' in {text!r}")
    if not with_method and spec.get("train", "both") not in ("both", "top", "bottom"):
        raise SystemExit(f"train must be 'both', 'top' or 'bottom' in {text!r}")
    if spec.get("train") == "both":  # the default is left out so that older cells keep their names
        del spec["train"]
    if with_method and spec["method"] != "original":
        if not 0 < spec["keep"] <= 1:
            raise SystemExit(f"keep must be in (0, 1] in {text!r}")
        for key, name in METHOD_OPTION_KEYS.items():  # the choices the command line offers for the option
            choices = method_options()[name][0].metadata.get("choices")
            if key in spec and choices and spec[key] not in choices:
                raise SystemExit(f"{key} must be one of {', '.join(map(str, choices))} in {text!r}")
        try:  # the method's own config checks the rest (ranges, combinations)
            method_config(spec)
        except GradotError as exc:
            raise SystemExit(f"bad emulator spec {text!r}: {exc}") from None
    return spec


def method_options_of(spec: dict) -> dict:
    """The spec's method options under the registry's names (``lambda`` sets both λs)."""
    options = {METHOD_OPTION_KEYS[k]: spec[k] for k in METHOD_OPTION_KEYS if k in spec}
    if "lambda" in spec:
        options["lambda_mlp"] = spec["lambda"]
    if "kfac_bf16" in spec:
        options["kfac_bf16"] = bool(spec["kfac_bf16"])
    return options


def method_config(spec: dict):
    """The spec's method config, built and checked by the method registry."""
    return make_config(get(spec["method"]).config, spec["keep"], method_options_of(spec))


def slug(spec: dict) -> str:
    """Readable, stable file name of a spec: the non-default settings, plus a short hash of all."""
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    parts = [spec.get("method", "recipe")] + [f"{k}{v}" for k, v in sorted(spec.items())
                                               if k != "method" and NAME_DEFAULTS.get(k) != v]
    return "-".join(parts + [digest])




def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="results/transfer")
    p.add_argument("--emulators", nargs="+", default=["uniform", "gradot"], help="METHOD:key=value,... (default keep: "
                   f"{DEFAULT_KEEP}, the library's)")
    p.add_argument("--recipes", nargs="+", default=[""])
    p.add_argument("--tasks", default="arc_easy,sciq,piqa,openbookqa")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout", type=int, default=160, help="held-back training rows scored per task")
    p.add_argument("--grad-batches", type=int, default=4, help="batches for the adapter-gradient cosine (0: skip)")
    p.add_argument("--ppl-sequences", type=int, default=8)
    p.add_argument("--ppl-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def bench_settings(args) -> dict:
    """What every cell depends on beyond its emulator and recipe (which its name holds)."""
    return {"model": args.model, "batch_size": args.batch_size, "heldout": args.heldout,
            "grad_batches": args.grad_batches, "ppl_sequences": args.ppl_sequences, "ppl_len": args.ppl_len,
            "seed": args.seed}


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        claim_folder(self.out, bench_settings(args), record=not args.report_only,
                     hint="use another --out, or give the settings the folder was computed with")
        self.cells = CellStore(self.out / "cells", report_only=args.report_only,
                               stamp=lambda: {"git_commit": git_commit()})
        self._model = self._tok = None
        self._factors: dict = {}
        self._data: dict = {}
        self._grads: dict = {}

    # -- shared state -------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            self._model, self._tok = load_model(self.args.model)
            self._model.eval()
        return self._model

    @property
    def tok(self):
        self.model
        return self._tok

    def cell(self, name: str, compute):
        return self.cells.cell(name, compute)

    def data(self, task: str, recipe: dict):
        """(training records, held-back pairs): a seeded shuffle of the train split, disjoint parts."""
        key = (task, recipe["steps"])
        if key not in self._data:
            rows = load_task(task, "train")
            random.Random(self.args.seed).shuffle(rows)
            n_train = recipe["steps"] * self.args.batch_size
            if len(rows) < n_train + self.args.heldout:
                raise SystemExit(f"{task}: {len(rows)} train rows, {n_train} + {self.args.heldout} needed")
            train = task_records(rows[:n_train])
            held = [(r.prompt, r.continuation()) for r in rows[n_train:n_train + self.args.heldout]]
            self._data[key] = (train, held)
        return self._data[key]

    # -- emulators ----------------------------------------------------------------------------
    def calibration(self, spec: dict) -> list:
        """The spec's calibration batches: task rows (``calib_data``) or WikiText-2, ``calib_skip``
        sequences in (another sample of the same size)."""
        if spec.get("calib_data"):
            return self.qa_calibration(spec)
        skip = spec.get("calib_skip", 0)
        if skip % 8:
            raise SystemExit(f"calib_skip={skip}: a multiple of the batch size 8, please")
        cs = CalibrationSpec(str(default_calibration_path()), spec["calib"] + skip, spec["calib_len"], 8)
        return calibration_batches(self.tok, cs)[skip // 8:]

    def qa_calibration(self, spec: dict) -> list[dict]:
        """Calibration like the data owner's training: (question, answer) rows of *other* public tasks'
        train splits (``calib_data=sciq+piqa``), loss on answer tokens only, ``calib`` x ``calib_len``
        tokens in all, 8 rows per batch."""
        rows = [(r.prompt, r.continuation()) for t in spec["calib_data"].split("+") for r in load_task(t, "train")]
        random.Random(self.args.seed).shuffle(rows)
        budget, picked, total = spec["calib"] * spec["calib_len"], [], 0
        for prompt, answer in rows:
            if total >= budget:
                break
            picked.append((prompt, answer))
            total += len(self.tok(prompt + answer).input_ids)
        if total < budget:
            raise SystemExit(f"calib_data={spec['calib_data']}: {total} tokens, {budget} wanted")
        return [encode_pairs(self.tok, picked[i:i + 8]) for i in range(0, len(picked), 8)]

    def build_emulator(self, spec: dict):
        split = split_model(self.model, spec["k"])
        method = spec["method"]
        if method == "original":
            return uniform_emulator(self.model, split, 1.0)
        from gradot.methods import compress

        if hasattr(get(method).config, "engine"):  # GradOT and its ablations: KFAC factors shared across specs
            from gradot.methods.gradot import gradot_emulator, kfac_products, middle_linears, needs_gradients
            from gradot.stats.kfac import collect_kfac

            method_options = method_config(spec)
            cfg = method_options.engine()
            selection = cfg.selection
            factors = None
            if selection != "svd":
                products = kfac_products(method_options)
                key = (spec["calib"], spec["calib_len"], spec.get("calib_data"), spec.get("calib_skip", 0), spec["k"],
                       selection == "wanda", needs_gradients(cfg), tuple(products.values()))
                if key not in self._factors:
                    batches = self.calibration(spec)
                    self._factors = {key: collect_kfac(
                        self.model, middle_linears(self.model, split, mlp_only=selection == "wanda"), batches,
                        gradients=needs_gradients(cfg), **products)}  # one set in memory at a time
                factors = self._factors[key]
            return gradot_emulator(self.model, split, cfg, factors, method=method)
        options = dict(adapter_layers=spec["k"], calib=None, calib_sequences=spec["calib"],
                       calib_len=spec["calib_len"], batch_size=8)
        options.update({k: spec[k] for k in ("distill_steps", "init") if k in spec})
        return compress(self.model, self.tok, method, spec["keep"], options)

    def emulator(self, spec: dict):
        """The emulator of a spec, built once and kept on disk; its privacy figures as a cell."""
        folder = self.out / "emulators" / slug(spec)
        if not (folder / "manifest.json").exists():
            t0 = time.perf_counter()
            emu = self.build_emulator(spec)
            if spec["refit"] != "none":
                batches = self.calibration(spec)
                compensate(self.model, emu, batches, ridge=spec["ridge"], scope=spec["refit"])
            emu.manifest.setdefault("settings", {})["bench_compress_seconds"] = round(time.perf_counter() - t0, 1)
            save_emulator(emu, folder, overwrite=True)
        emu = load_emulator(folder)

        def privacy():
            test = resolve_data_dir() / "text" / "wikitext-2-raw" / "wiki.test.raw"
            ppl = calibration_batches(self.tok, CalibrationSpec(str(test), self.args.ppl_sequences, self.args.ppl_len, 4))
            return {"spec": spec, "keep_achieved": emu.manifest["size"]["keep_achieved"],
                    "depth": emu.manifest["size"]["emulator_depth"], "perplexity": perplexity(emu.model, ppl),
                    "compress_seconds": emu.manifest["settings"].get("bench_compress_seconds")}

        return emu, self.cell(f"emulator-{slug(spec)}", privacy)

    # -- training and scoring -----------------------------------------------------------------
    def train(self, emu, recipe: dict, task: str) -> dict:
        train, _ = self.data(task, recipe)
        if recipe["loss"] == "all":  # every token of prompt + answer labelled
            train = [p + c for p, c in train]
        trained = emu
        if recipe.get("train"):  # one half of the adapter only: the other half is marked middle (frozen)
            half = len(emu.adapter_positions) // 2
            frozen = emu.adapter_positions[half:] if recipe["train"] == "bottom" else emu.adapter_positions[:half]
            slots = [dict(s, role="middle") if i in frozen else s for i, s in enumerate(emu.manifest["slots"])]
            trained = Emulator(emu.model, {**emu.manifest, "slots": slots})
        callbacks = [PullCallback(trained.adapter_parameters(), recipe["pull"])] if recipe["pull"] else None
        with tempfile.TemporaryDirectory(prefix="gradot-transfer-") as tmp:  # checkpoints: never results
            cfg = FinetuneConfig(output_dir=tmp, task=task, learning_rate=recipe["lr"], max_steps=recipe["steps"],
                                 batch_size=self.args.batch_size, seed=self.args.seed, lora_r=recipe["lora"],
                                 save_steps=10**6, logging_steps=max(1, recipe["steps"] // 4))
            trained, stats = finetune_adapter(trained, self.tok, train, cfg, callbacks=callbacks)
        emu.model = trained.model
        return {k: v for k, v in stats.items() if k in ("train_loss", "seconds_per_step", "steps")}

    def plugged_losses(self, emu, held) -> list[float]:
        """The original model's held-out losses with the emulator's adapter layers plugged in."""
        own = adapter_state_dict(self.model, emu.adapter_sources)
        saved = {k: v.detach().clone() for k, v in own.items()}
        trained = adapter_state_dict(emu.model, emu.adapter_sources, emu.adapter_positions)
        try:
            with torch.no_grad():
                for name, t in trained.items():
                    own[name].copy_(t)
            return answer_losses(self.model, self.tok, held, batch_size=16, desc="plug-in loss")
        finally:
            with torch.no_grad():
                for name, t in saved.items():
                    own[name].copy_(t)

    def gradients(self, model, positions, task, recipe):
        train, _ = self.data(task, recipe)
        n = self.args.grad_batches * self.args.batch_size
        batches = [encode_pairs(self.tok, train[i:i + self.args.batch_size]) for i in range(0, n, self.args.batch_size)]
        return adapter_gradients(model, positions, batches)

    def reference(self, recipe: dict, task: str, k: int = 2) -> dict:
        """Adapter FT on the original with this recipe and split: the base and direct losses per row."""
        def compute():
            _, held = self.data(task, recipe)
            base = answer_losses(self.model, self.tok, held, batch_size=16, desc="base loss")
            original = uniform_emulator(self.model, split_model(self.model, k), 1.0)
            training = self.train(original, recipe, task)
            direct = answer_losses(original.model, self.tok, held, batch_size=16, desc="direct loss")
            return {"task": task, "recipe": recipe, "k": k, "base": base, "direct": direct, "training": training}

        return self.cell(f"reference-{task}-{slug(recipe)}" + (f"-k{k}" if k != 2 else ""), compute)

    def transfer_cell(self, spec: dict, recipe: dict, task: str) -> dict | None:
        ref = self.reference(recipe, task, spec["k"])
        if ref is None:
            return None

        def compute():
            _, held = self.data(task, recipe)
            emu, _ = self.emulator(spec)
            out = {"task": task, "emulator": spec, "recipe": recipe}
            if self.args.grad_batches:
                key = (task, recipe["steps"], spec["k"])  # the adapter (and its gradient) grows with k
                if key not in self._grads:
                    self._grads[key] = self.gradients(self.model, split_model(self.model, spec["k"]).adapter, task, recipe)
                cos = cosines(self._grads[key], self.gradients(emu.model, emu.adapter_positions, task, recipe))
                out["grad_cosine"] = mean_and_stderr(cos)
            out["emu_before"] = answer_losses(emu.model, self.tok, held, batch_size=16, desc="emulator loss")
            out["training"] = self.train(emu, recipe, task)
            out["emu_after"] = answer_losses(emu.model, self.tok, held, batch_size=16, desc="emulator FT loss")
            out["plugged"] = self.plugged_losses(emu, held)
            out["transfer"] = loss_transfer(ref["base"], out["plugged"], ref["direct"])
            return out

        return self.cell(f"cell-{task}-{slug(spec)}-{slug(recipe)}", compute)


class PullCallback(TrainerCallback):
    """L2 pull of the adapter toward its starting weights (L2-SP), added to the gradient before each
    optimizer step: the data owner keeps the adapter near what the full model expects."""

    def __init__(self, params, strength: float):
        self.params, self.strength = list(params), strength
        self.start = [p.detach().clone() for p in self.params]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for p, p0 in zip(self.params, self.start):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=self.strength)


def mean(xs):
    return sum(xs) / len(xs)


def summarize(cells, emulators, tasks) -> list[dict]:
    rows = []
    for espec, recipe, per_task in cells:
        done = {t: c for t, c in per_task.items() if c is not None}
        if not done:
            continue
        em = emulators.get(slug(espec)) or {}
        tr = [done[t]["transfer"] for t in tasks if t in done]
        n = len(tr)
        row = {
            "emulator": espec, "recipe": recipe, "tasks": sorted(done),
            "transfer_mean": sum(r for r, _ in tr) / n,
            "transfer_se": (sum(se ** 2 for _, se in tr)) ** 0.5 / n,
            "per_task": {t: done[t]["transfer"] for t in done},
            "emu_loss_before": mean([mean(done[t]["emu_before"]) for t in done]),
            "emu_loss_after": mean([mean(done[t]["emu_after"]) for t in done]),
            "grad_cosine": mean([done[t]["grad_cosine"][0] for t in done]) if all("grad_cosine" in done[t] for t in done) else None,
            "keep_achieved": em.get("keep_achieved"), "perplexity": em.get("perplexity"),
            "compress_seconds": em.get("compress_seconds"),
            "seconds_per_step": mean([done[t]["training"]["seconds_per_step"] or 0 for t in done]),
        }
        rows.append(row)
    return rows


def describe(spec: dict, defaults: dict = NAME_DEFAULTS) -> str:
    """A row label: keep, and the settings that differ from the names' defaults (fixed, so a label
    always means the same settings)."""
    text = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method" and (k == "keep" or defaults.get(k) != v))
    return f"{spec['method']} {text}".strip() if "method" in spec else (text or "default")


def report(args, out: Path, rows, refs, missing, tasks):
    lines = ["# Transfer bench", "",
             f"Command: `{' '.join(['python', 'bench/transfer.py', *sys.argv[1:]])}`  ",
             f"Commit {git_commit()}; {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
             f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}  ",
             f"Model {args.model}; tasks {', '.join(tasks)}; {args.batch_size} rows per step; "
             f"{args.heldout} held-back training rows per task.", "",
             "transfer = (base − plugged) / (base − direct) of the original model's mean answer-token loss on "
             "held-back rows, paired per row; mean over tasks ± standard error. Emu loss before/after: the "
             "emulator's own held-out loss before and after training (stand-ins for Emu ZS / Emu FT). "
             "ppl: WikiText-2 test token perplexity of the emulator (higher = more private).", "",
             "| emulator | recipe | keep | ppl | emu loss before | emu loss after | grad cos | transfer | "
             + " | ".join(tasks) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        per = [f"{r['per_task'][t][0]:.2f} ± {r['per_task'][t][1]:.2f}" if t in r["per_task"] else "–" for t in tasks]
        lines.append(
            f"| {describe(r['emulator'])} | {describe(r['recipe'])} | "
            f"{(r['keep_achieved'] or float('nan')):.3f} | {(r['perplexity'] or float('nan')):.0f} | "
            f"{r['emu_loss_before']:.3f} | {r['emu_loss_after']:.3f} | "
            f"{r['grad_cosine'] if r['grad_cosine'] is None else round(r['grad_cosine'], 3)} | "
            f"**{r['transfer_mean']:.2f} ± {r['transfer_se']:.2f}** | " + " | ".join(per) + " |")
    lines += ["", "Direct training (Adapter FT) per task and recipe: base → direct mean held-out loss.", ""]
    for ref in refs:
        lines.append(f"- {ref['task']}, {describe(ref['recipe'])}, k={ref.get('k', 2)}: "
                     f"{mean(ref['base']):.3f} → {mean(ref['direct']):.3f}")
    if missing:
        lines += ["", f"Cells not computed yet: {len(missing)}."]
    if rows:
        plot_frontier(rows, out / "frontier.png")
        lines += ["", "![transfer against privacy](frontier.png)"]
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    (out / "transfer.json").write_text(json.dumps({"command": " ".join(sys.argv), "git_commit": git_commit(),
                                                    "rows": rows, "missing": missing}, indent=1))
    print("\n".join(lines))


def plot_frontier(rows, path: Path) -> None:
    """Loss transfer against the two privacy figures (emulator perplexity, its held-out loss before
    training), one series per method and lever, points labelled with the achieved keep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    series: dict[str, list] = {}
    for r in rows:
        e = {k: v for k, v in r["emulator"].items() if k not in ("keep",)}
        label = describe(e) + ("" if describe(r["recipe"]) == "default"
                                                  else f" [{describe(r['recipe'])}]")
        series.setdefault(label, []).append(r)
    for label, rs in series.items():  # a row whose emulator record is missing has no privacy figure
        rs = sorted((r for r in rs if r["perplexity"] is not None), key=lambda r: r["keep_achieved"] or 0)
        for ax, x in zip(axes, ("perplexity", "emu_loss_before")):
            xs = [r[x] for r in rs]
            ax.errorbar(xs, [r["transfer_mean"] for r in rs], yerr=[r["transfer_se"] for r in rs],
                        marker="o", capsize=2, label=label)
            for r, xv in zip(rs, xs):
                ax.annotate(f"{r['keep_achieved']:.2f}", (xv, r["transfer_mean"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("emulator perplexity (WikiText-2 test; higher = more private)")
    axes[1].set_xlabel("emulator held-out answer loss before training (higher = more private)")
    axes[0].set_ylabel("loss transfer")
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].legend(fontsize=6, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    tasks = args.tasks.split(",")
    emulators = [parse_spec(e, EMULATOR_KEYS, EMULATOR_DEFAULTS, True) for e in args.emulators]
    recipes = [parse_spec(r, RECIPE_KEYS, RECIPE_DEFAULTS, False) for r in args.recipes]
    try:
        bench = Bench(args)
    except GradotError as exc:  # a folder of cells computed with other settings
        raise SystemExit(str(exc)) from None
    cells, emu_rows, missing = {}, {}, []
    for espec in emulators:
        for recipe in recipes:
            for task in tasks:
                value = bench.transfer_cell(espec, recipe, task)
                if value is None:
                    missing.append(f"{task}/{slug(espec)}/{slug(recipe)}")
                if value is not None:
                    r = value["transfer"]
                    print(f"{task:11s} {slug(espec):40s} {slug(recipe):28s} transfer {r[0]:.3f} ± {r[1]:.3f}", flush=True)
    # The report covers every cell in the folder, not only this command's: a narrow rerun must not
    # drop earlier rows from transfer.md.
    for path in sorted((bench.out / "cells").glob("cell-*.json")):
        value = json.loads(path.read_text())
        key = (json.dumps(value["emulator"], sort_keys=True), json.dumps(value["recipe"], sort_keys=True))
        cells.setdefault(key, {})[value["task"]] = value
    for path in sorted((bench.out / "cells").glob("emulator-*.json")):
        emu_rows[path.stem[len("emulator-"):]] = json.loads(path.read_text())
    refs = [json.loads(p.read_text()) for p in sorted((bench.out / "cells").glob("reference-*.json"))]
    tasks = sorted(set(tasks) | {task for per_task in cells.values() for task in per_task},
                   key=lambda t: (t not in tasks, t))
    rows = summarize([(json.loads(e), json.loads(r), v) for (e, r), v in cells.items()], emu_rows, tasks)
    report(args, bench.out, rows, refs, missing, tasks)


if __name__ == "__main__":
    main()
