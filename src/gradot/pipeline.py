"""The whole protocol on real tasks, in the published table layout.

Per method: compress once. Per task: Full ZS, Adapter FT (the adapter layers fine-tuned directly on
the original with the same recipe: every emulator's ceiling), Emu ZS, Emu FT (adapter fine-tuned on
the emulator), Plug-in (that adapter in the original model), the transfer ratio
(Plug-in − Full ZS) / (Adapter FT − Full ZS), and with ``full_ft`` the Full FT upper bound. Every
finished cell (an evaluation, a fine-tuned adapter) is cached under the output folder, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .artifacts import load_emulator, plug_in, plug_into_emulator, save_adapter, save_emulator
from .cells import SETTINGS_FILE, CellStore, claim_folder  # noqa: F401  (SETTINGS_FILE re-exported)
from .finetune import (FULL_LR, TASK_LR, FinetuneConfig, finetune_adapter, finetune_full, remove_checkpoints,
                       task_records)
from .evaluation.lmeval import evaluate
from .methods import compress, runtime_options
from .pipeline_report import METHOD_ROWS, ORIGINAL_ROWS, write_report
from .registry import decoder_layers
from .split import Split, adapter_state_dict
from .evaluation.tasks import TASK_NAMES, load_task
from .errors import PipelineSettingsError  # noqa: F401  (re-exported)


@dataclass
class PipelineConfig:
    model: str
    methods: list[str]
    tasks: list[str]
    keep: float
    out: str
    full_ft: bool = False
    adapter_ft: bool = True  # the Adapter FT row (transfer's denominator)
    limit: int | None = None  # validation examples per task (None: all)
    train_limit: int | None = 1000  # training rows per task (None: all)
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    max_length: int = 256  # tokens per training example
    eval_batch_size: int = 8
    learning_rate: float | None = None  # adapter fine-tuning (None: the task's default, TASK_LR)
    full_learning_rate: float | None = None  # Full FT (None: FULL_LR); every parameter moves, so lower
    lora_r: int = 0
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"  # where the models are evaluated (fine-tuning: transformers' Trainer decides)
    bf16: bool = False  # bf16 mixed-precision fine-tuning
    compress_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # the weights' dtype for compression and evaluation
    command: str = ""
    report_only: bool = False  # build the table from the cells already computed; compute nothing
    keep_checkpoints: bool = False  # keep fine-tuning checkpoints once their cell is done
    revision: str | None = None  # a Hub model's branch, tag or commit


def cell_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings every cell's value depends on (cell keys name only method and task).

    Which methods and tasks run, where, and how large the evaluation batches are do not enter:
    a folder may be filled one task or method at a time, on any device.
    """
    return {
        "model": cfg.model, "revision": cfg.revision, "keep": cfg.keep, "dtype": cfg.dtype, "limit": cfg.limit,
        "train_limit": cfg.train_limit, "epochs": cfg.epochs, "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "learning_rates": learning_rates(cfg.learning_rate, cfg.full_learning_rate),
        "lora_r": cfg.lora_r, "seed": cfg.seed,
        "data_dir": cfg.data_dir, "bf16": cfg.bf16,
        "compress_args": {k: v for k, v in cfg.compress_args.items() if k not in runtime_options()},
    }


#: The default rates when a folder's record still named ``learning_rate`` (the CLI's --lr, which then
#: set the adapters' and Full FT's rate alike): adapter 1e-4 for every task, Full FT 2e-5.
_LEGACY_ADAPTER_LR, _LEGACY_FULL_LR = 1e-4, 2e-5


def learning_rates(adapter_lr: float | None, full_lr: float | None, task_lr=None, full_table=None) -> dict:
    """The rate each task's cells are trained with, adapter and Full FT: the effective numbers, so a
    folder is refused when a default changed under it, and claimed again by naming its old rate."""
    task_lr, full_table = task_lr or TASK_LR, full_table or FULL_LR
    tasks = sorted(TASK_NAMES)  # the tasks with training data
    return {"adapter": {t: adapter_lr if adapter_lr is not None else task_lr.get(t, task_lr["default"]) for t in tasks},
            "full": {t: full_lr if full_lr is not None else full_table.get(t, full_table["default"]) for t in tasks}}


def _upgrade_record(old: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``old`` in today's form: keys added since it was recorded get the values its cells were
    computed with."""
    old = _with_new_option_defaults(old, settings)
    if "learning_rates" not in old:
        given = old.pop("learning_rate", None)  # then --lr set the adapters' and Full FT's rate alike
        old["learning_rates"] = learning_rates(given, given, {"default": _LEGACY_ADAPTER_LR},
                                               {"default": _LEGACY_FULL_LR})
    return old


def _with_new_option_defaults(old: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the method options it lacks at their defaults: an option added since the folder
    was recorded (a newly registered method's) computes, at its default, what the cells computed."""
    from .methods import method_options

    before, now = old.get("compress_args"), settings.get("compress_args")
    if not isinstance(before, dict) or not isinstance(now, dict):
        return old
    options = method_options()
    added = {k: options[k][0].default for k in now if k not in before and k in options}
    return {**old, "compress_args": {**before, **added}}


def claim_output_folder(out: Path, settings: dict[str, Any], record: bool = True) -> None:
    """Refuse a folder whose cells were computed with other settings; record ours otherwise.

    A folder with cells but no record (made before records existed) is adopted as it is.
    """
    claim_folder(out, settings, record, upgrade=_upgrade_record, error=PipelineSettingsError,
                 hint="use another --out, give the settings the folder was computed with (e.g. its --lr), or "
                      "remove the folder to start over")


class Pipeline:
    def __init__(self, cfg: PipelineConfig, model, tokenizer):
        self.cfg, self.model, self.tok = cfg, model, tokenizer
        self.out = Path(cfg.out)
        # Refused here when the folder's record differs; our record is written only before the first
        # cell is computed, so a run that fails before that (bad data, a model that does not load)
        # leaves nothing that would refuse its own corrected retry.
        claim_output_folder(self.out, cell_settings(cfg), record=False)
        self._recorded = cfg.report_only
        self.cells = CellStore(self.out / "cells", report_only=cfg.report_only)
        if cfg.report_only:  # no model needed to read cells
            return
        # Plug-in only ever writes the adapter layers: remember them to restore the original after.
        split = Split(len(decoder_layers(model)), cfg.compress_args.get("adapter_layers", 2))
        self.original_adapter = {k: v.detach().clone() for k, v in adapter_state_dict(model, split.adapter).items()}
        self.split = split

    # -- caching ------------------------------------------------------------------------------
    def _record_settings(self) -> None:
        """Write the folder's settings record (once, before the first computation)."""
        if not self._recorded:
            claim_output_folder(self.out, cell_settings(self.cfg), record=True)
            self._recorded = True

    def _cell(self, key: str, compute, label: str | None = None):
        def stage(cached: bool) -> None:
            self._stage(label or key, cached=cached)
            if not cached:
                self._record_settings()

        return self.cells.cell(key, compute, on_stage=stage)

    def _evaluate(self, model, task: str) -> dict:
        t0 = time.perf_counter()
        result = evaluate(model, self.tok, [task], data_dir=self.cfg.data_dir, limit=self.cfg.limit,
                          batch_size=self.cfg.eval_batch_size)[task]
        n = result.get("n") or 1
        result["seconds_per_example"] = (time.perf_counter() - t0) / n
        return result

    def _restore_original(self):
        own = adapter_state_dict(self.model, self.split.adapter)
        with torch.no_grad():
            for name, t in self.original_adapter.items():
                own[name].copy_(t)

    def _ft_config(self, folder: Path, task: str, full: bool = False) -> FinetuneConfig:
        c = self.cfg
        lr = c.full_learning_rate if full else c.learning_rate
        return FinetuneConfig(output_dir=str(folder), task=task, learning_rate=lr, epochs=c.epochs,
                              max_steps=c.max_steps, batch_size=c.batch_size, max_length=c.max_length,
                              seed=c.seed, lora_r=c.lora_r,
                              resume=True, save_steps=50, logging_steps=10, bf16=c.bf16)

    def _records(self, task: str):
        return task_records(load_task(task, "train", data_dir=self.cfg.data_dir, limit=self.cfg.train_limit))

    # -- progress -----------------------------------------------------------------------------
    def _stage(self, label: str, cached: bool = False) -> None:
        """``[3/12] gradot: Emu FT on piqa (…, about 9 min left)`` on stderr, one line per stage."""
        if self.cfg.report_only:
            return
        if getattr(self, "_counter", None) is None:
            from .progress import StageCounter

            c = self.cfg
            per_task = 1 + int(c.full_ft) + int(c.adapter_ft)  # Full ZS (+ Full FT, Adapter FT)
            per_method = 1 + 3 * len(c.tasks)  # compress, then Emu ZS, Emu FT, Plug-in per task
            self._counter = StageCounter(per_task * len(c.tasks) + per_method * len(c.methods))
        self._counter.start(label, cached)

    # -- steps --------------------------------------------------------------------------------
    def emulator(self, method: str):
        folder = self.out / "emulators" / f"{method}-keep{self.cfg.keep}"
        if not self.cfg.report_only:
            done = (folder / "manifest.json").exists()
            self._stage(f"{method}: compress the model (keep {self.cfg.keep})", cached=done)
        if not (folder / "manifest.json").exists() and not self.cfg.report_only:
            self._record_settings()
            emulator = compress(self.model, self.tok, method, self.cfg.keep, self.cfg.compress_args)
            save_emulator(emulator, folder, overwrite=True, tokenizer=self.tok)
        return folder

    def run(self) -> dict:
        c = self.cfg
        cells: dict[str, dict[str, dict]] = {}
        for task in c.tasks:
            cells.setdefault("Full ZS", {})[task] = self._cell(f"full_zs-{task}", lambda: self._evaluate(self.model, task),
                                                               f"Full ZS on {task}")
            if c.full_ft:
                cells.setdefault("Full FT", {})[task] = self._cell(f"full_ft-{task}", lambda: self._full_ft(task),
                                                                   f"Full FT on {task}")
            if c.adapter_ft:
                cells.setdefault("Adapter FT", {})[task] = self._cell(f"adapter_ft-{task}", lambda: self._adapter_ft(task),
                                                                      f"Adapter FT on {task}")
        for method in c.methods:
            emu_dir = self.emulator(method)
            for task in c.tasks:
                row = lambda name: cells.setdefault(f"{method}: {name}", {})  # noqa: E731
                row("Emu ZS")[task] = self._cell(f"{method}-emu_zs-{task}",
                                                 lambda: self._evaluate(load_emulator(emu_dir, device=c.device).model, task),
                                                 f"{method}: Emu ZS on {task}")
                adapter_dir = self.out / "adapters" / f"{method}-keep{c.keep}-{task}"
                row("Emu FT")[task] = self._cell(f"{method}-emu_ft-{task}", lambda: self._emu_ft(emu_dir, adapter_dir, task),
                                                 f"{method}: Emu FT on {task}")
                row("Plug-in")[task] = self._cell(f"{method}-plugin-{task}", lambda: self._plugin(adapter_dir, task),
                                                  f"{method}: Plug-in on {task}")
        if getattr(self, "_counter", None) is not None:
            self._counter.done()
        cells = {row: {t: v for t, v in per_task.items() if v is not None} for row, per_task in cells.items()}
        return self.report(cells)

    def _emu_ft(self, emu_dir: Path, adapter_dir: Path, task: str) -> dict:
        emulator = load_emulator(emu_dir, device=self.cfg.device)
        if not (adapter_dir / "manifest.json").exists():
            cfg = self._ft_config(self.out / "checkpoints" / adapter_dir.name, task)
            emulator, stats = finetune_adapter(emulator, self.tok, self._records(task), cfg)
            save_adapter(emulator, adapter_dir, training={k: v for k, v in stats.items() if k != "loss_history"},
                         overwrite=True)
            self._drop_checkpoints(cfg)
        else:  # the adapter survived an interruption: evaluate it without retraining
            plug_into_emulator(emulator, adapter_dir)
        result = self._evaluate(emulator.model, task)
        result["training"] = json.loads((adapter_dir / "manifest.json").read_text())["training"]
        return result

    def _plugin(self, adapter_dir: Path, task: str) -> dict:
        try:
            plug_in(self.model, adapter_dir, k=self.split.k)
            return self._evaluate(self.model, task)
        finally:
            self._restore_original()

    def _adapter_ft(self, task: str) -> dict:
        """The adapter layers trained on the original itself (a keep-1.0 emulator), same recipe."""
        from .methods.uniform import uniform_emulator

        original = uniform_emulator(self.model, self.split, 1.0)
        cfg = self._ft_config(self.out / "checkpoints" / f"adapter-{task}", task)
        original, stats = finetune_adapter(original, self.tok, self._records(task), cfg)
        result = self._evaluate(original.model, task)
        result["training"] = {k: v for k, v in stats.items() if k != "loss_history"}
        del original
        self._drop_checkpoints(cfg)  # the cell is about to be written: nothing left to resume
        return result

    def _full_ft(self, task: str) -> dict:
        model = copy.deepcopy(self.model)
        cfg = self._ft_config(self.out / "checkpoints" / f"full-{task}", task, full=True)
        model, stats = finetune_full(model, self.tok, self._records(task), cfg)
        result = self._evaluate(model, task)
        result["training"] = {k: v for k, v in stats.items() if k != "loss_history"}
        del model
        self._drop_checkpoints(cfg)  # the cell is about to be written: nothing left to resume
        return result

    def _drop_checkpoints(self, ft: FinetuneConfig) -> None:
        if not self.cfg.keep_checkpoints:
            remove_checkpoints(ft.output_dir)
            parent = Path(ft.output_dir).parent
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()

    # -- report -------------------------------------------------------------------------------
    def report(self, cells: dict[str, dict[str, dict]]) -> dict:
        """The folder's report: this run's cells and every other cell the folder holds (a task or
        method computed by an earlier command with the same settings), so that running one task per
        command never leaves a report of the last task alone. This run's tasks and methods come first."""
        found_tasks, found_methods = set(), set()
        for row, task, cell in folder_cells(self.out / "cells"):
            cells.setdefault(row, {}).setdefault(task, cell)
            found_tasks.add(task)
            if ": " in row:
                found_methods.add(row.split(": ", 1)[0])
        order = {t: i for i, t in enumerate(TASK_NAMES)}
        tasks = list(self.cfg.tasks) + sorted(found_tasks - set(self.cfg.tasks), key=order.__getitem__)
        methods = list(self.cfg.methods) + sorted(found_methods - set(self.cfg.methods))
        return write_report(self.out, replace(self.cfg, tasks=tasks, methods=methods), cells)


def folder_cells(cells_dir: Path):
    """``(row, task, cell)`` for every cell file in a pipeline folder (names as ``Pipeline.run`` writes them:
    ``full_zs-TASK`` for the original's rows, ``METHOD-emu_zs-TASK`` for a method's; ``ORIGINAL_ROWS``,
    ``METHOD_ROWS``)."""
    for path in sorted(cells_dir.glob("*.json")):
        parts = path.stem.split("-")
        if len(parts) == 2 and parts[0] in ORIGINAL_ROWS:
            row, task = ORIGINAL_ROWS[parts[0]], parts[1]
        elif len(parts) == 3 and parts[1] in METHOD_ROWS:
            row, task = f"{parts[0]}: {METHOD_ROWS[parts[1]]}", parts[2]
        else:
            continue  # not a cell of this pipeline (a user's file): not part of the table
        if task in TASK_NAMES:
            yield row, task, json.loads(path.read_text())
