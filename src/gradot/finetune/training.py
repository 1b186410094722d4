"""Training with transformers' ``Trainer``: the config, the run (with its settings recorded and
checked on resume), LoRA on the adapter layers, ``finetune_adapter`` and ``finetune_full``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..emulator import Emulator
from ..errors import CheckpointConflictError
from ..freezing import requiring_grad
from ..evaluation.head_loss import HeadAtLabels
from ..registry import arch_of, decoder_layers, is_linear
from .checkpoints import RUN_FILE, last_checkpoint, load_trainable, save_trainable, trainable_parameters
from .data import CausalLMCollator, FinetuneDataset, pad_token_id


log = logging.getLogger(__name__)


#: Default adapter learning rate per task (used when ``FinetuneConfig.learning_rate`` is None).
#: 3e-4, not offsite-tuning's 1e-4: at the CLI's one epoch of 1000 rows (125 steps) on a GradOT keep-0.7
#: emulator of the default model, the plugged adapter's held-out answer loss is 0.32 ± 0.05 lower
#: (3.23 against 3.55; loss transfer 0.835 against 0.764) and ARC-Easy accuracy is equal (plug-in 61.4
#: at both, Adapter FT 63.2 against 60.7): docs/transfer.md, "Third round". Not tuned per task.
TASK_LR: dict[str, float] = {
    "default": 3e-4,
    "openbookqa": 3e-4,
    "piqa": 3e-4,
    "arc_easy": 3e-4,
    "arc_challenge": 3e-4,
    "hellaswag": 3e-4,
    "sciq": 3e-4,
    "webquestions": 3e-4,
    "race": 3e-4,
}


#: Default learning rate for full fine-tuning (every parameter moves, so a lower rate).
FULL_LR: dict[str, float] = {"default": 2e-5}


#: Settings that do not change what is trained: where and how often to save or log, whether to resume,
#: how the loss is computed (the same loss either way, to float rounding).
_BOOKKEEPING = ("output_dir", "logging_steps", "save_steps", "save_total_limit", "resume", "head_at_labels")


#: Settings a resumed run may change: how long to train.
_LENGTH = ("max_steps", "epochs")


def default_learning_rate(task: str | None, full: bool = False) -> float:
    table = FULL_LR if full else TASK_LR
    return table.get(task or "default", table["default"])


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (adapter or full)."""

    output_dir: str = field(metadata=_help("folder for checkpoints (checkpoint-<step>/) and the Trainer's state"))
    task: str | None = field(default=None, metadata=_help(
        "task name, only used to pick the default learning rate from TASK_LR / FULL_LR"))
    learning_rate: float | None = field(default=None, metadata=_help(
        "peak learning rate; None: the task's default (TASK_LR for adapters, FULL_LR for full fine-tuning)"))
    epochs: float = field(default=1.0, metadata=_help("passes over the data (ignored when max_steps > 0)"))
    max_steps: int = field(default=-1, metadata=_help("optimizer steps to run in total; -1: use epochs"))
    batch_size: int = field(default=8, metadata=_help("examples per device per forward pass"))
    grad_accum: int = field(default=1, metadata=_help("forward passes accumulated per optimizer step"))
    max_length: int = field(default=256, metadata=_help(
        "tokens per example; longer pairs lose the start of the prompt, longer texts are windowed"))
    seed: int = field(default=0, metadata=_help("seed of initialisation (LoRA), dropout and data order"))
    warmup_ratio: float = field(default=0.0, metadata=_help("fraction of the steps with linear warm-up, in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not applied to biases and norms)"))
    lr_scheduler: str = field(default="linear", metadata=_help(
        "transformers scheduler name: linear, cosine, constant, constant_with_warmup, ..."))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm (0: no clipping)"))
    logging_steps: int = field(default=10, metadata=_help("optimizer steps between loss log entries"))
    save_steps: int = field(default=500, metadata=_help("optimizer steps between checkpoints (also saved at the end)"))
    save_total_limit: int | None = field(default=2, metadata=_help("checkpoints kept (oldest deleted); None: all"))
    bf16: bool = field(default=False, metadata=_help("bf16 mixed precision (needs hardware support)"))
    lora_r: int = field(default=0, metadata=_help("LoRA rank on the adapter layers' linears; 0: train whole layers"))
    lora_alpha: int = field(default=16, metadata=_help("LoRA scaling numerator (scale = alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA input"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest complete checkpoint in output_dir, if there is one"))
    head_at_labels: bool = field(default=True, metadata=_help(
        "apply the LM head only at labelled positions, in chunks (gradot.evaluation.head_loss); False: the model's "
        "own loss over full logits (same loss to float rounding, slower; kept as the benchmarks' reference)"))

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"FinetuneConfig.{name}: {why} (got {getattr(self, name)!r})")

        if not str(self.output_dir):
            bad("output_dir", "must be a folder path")
        if self.learning_rate is not None and not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if self.max_steps <= 0 and self.max_steps != -1:
            bad("max_steps", "must be > 0, or -1 to use epochs")
        if self.max_steps == -1 and not self.epochs > 0:
            bad("epochs", "must be > 0 when max_steps is -1")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if self.max_length < 2:
            bad("max_length", "must be >= 2")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.lora_r < 0:
            bad("lora_r", "must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            bad("save_total_limit", "must be >= 1 or None")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def run_loss(log_history: Sequence[dict]) -> float | None:
    """The mean training loss over every step of the run, from the Trainer's log history.

    Each ``loss`` entry is the mean over the steps since the previous one, so the entries weighted by
    their step counts give the whole run's mean, also across a resume (the history is restored from
    the checkpoint). ``_LogBeforeSave`` makes sure no step goes unlogged. None: no loss was logged.
    """
    total, last, steps = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > last:
            total += entry["loss"] * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


def _labelled_progress(label: str):
    from tqdm.auto import tqdm
    from transformers.trainer_callback import ProgressCallback

    from ..progress import verbose

    class LabelledProgress(ProgressCallback):
        """The Trainer's bar, named (``training adapter on piqa``), the latest loss beside it; the
        log dictionaries it prints every ``logging_steps`` only under ``gradot -v``."""

        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.close()
                self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, desc=label)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if verbose():
                return super().on_log(args, state, control, logs=logs, **kwargs)
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

    return LabelledProgress


class _AlreadyFinished(Exception):
    """Raised at the start of a resumed run whose checkpoint already holds every step."""


def _log_before_save():
    from transformers import TrainerCallback

    class LogBeforeSave(TrainerCallback):
        """Log the loss at every checkpoint and at the last step, so that the log history (saved
        in each checkpoint) covers every step and a resumed run still knows the whole run's loss.
        A resumed run that has no step left stops before its first step (the Trainer would run one
        more step when the checkpoint ends inside an epoch)."""

        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step and state.global_step >= state.max_steps:
                raise _AlreadyFinished

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogBeforeSave()


def _trainer_class():
    from transformers import Trainer

    class TrainableOnlyTrainer(Trainer):
        """A ``Trainer`` whose checkpoints hold only the trainable parameters (safetensors) and,
        given ``head_at_labels`` (a :class:`gradot.evaluation.head_loss.HeadAtLabels`), whose loss applies the
        LM head only at labelled positions."""

        def __init__(self, *args, head_at_labels=None, **kwargs):
            if head_at_labels is not None:
                # The Trainer pops the labels, runs the model (its head skipped by the hook) and
                # calls this with the labels and the accumulated batch's token count.
                kwargs["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: (
                    head_at_labels.loss(labels, num_items_in_batch))
            super().__init__(*args, **kwargs)
            self.head_at_labels = head_at_labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.head_at_labels is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with self.head_at_labels:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if not self.args.should_save:
                return
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_trainable(self.model, output_dir, state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            load_trainable(model if model is not None else self.model, resume_from_checkpoint)

    return TrainableOnlyTrainer


def output_head(model: nn.Module) -> nn.Module:
    """The LM head of a causal LM, or of the model inside a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embedding (LM head)")
    return head


def lora_target_modules(model: nn.Module, positions: Sequence[int]) -> list[str]:
    """Full names of every linear (``nn.Linear`` or GPT-2 ``Conv1D``) in the decoder layers at
    ``positions``, e.g. ``model.layers.0.self_attn.q_proj``."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    names = []
    for pos in positions:
        for name, module in layers[pos].named_modules():
            if is_linear(module, arch):
                names.append(f"{arch.layers}.{pos}.{name}")
    if not names:
        raise ValueError(f"no linear layers found in decoder layers {list(positions)}")
    return names


def _with_lora(model: nn.Module, positions: Sequence[int], cfg: FinetuneConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    set_seed(cfg.seed)  # LoRA's A matrices are random
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model, positions),
        fan_in_fan_out=arch_of(model).conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _bf16_on_cpu(cfg: FinetuneConfig) -> bool:
    """bf16 asked for on a machine without a bf16 GPU: CPU autocast if there is no GPU at all."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    if not cfg.bf16 or is_torch_bf16_gpu_available() or is_torch_xla_available():
        return False
    if torch.cuda.is_available():
        raise ValueError("bf16 needs an Ampere or newer GPU; this GPU does not support it (leave bf16 off)")
    return True


def _training_arguments(cfg: FinetuneConfig, learning_rate: float):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.output_dir),
        learning_rate=learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        seed=cfg.seed,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        bf16=cfg.bf16,
        use_cpu=_bf16_on_cpu(cfg),  # otherwise transformers refuses bf16 on a CPU-only machine
        report_to=[],
        disable_tqdm=False,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def _meter():
    from transformers import TrainerCallback

    class RunMeter(TrainerCallback):
        """Steps, tokens and wall time of THIS run (a resumed run starts at the checkpoint)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = (state.global_step, state.num_input_tokens_seen, time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            step0, tokens0, t0 = self.start
            self.steps = state.global_step - step0
            self.tokens = state.num_input_tokens_seen - tokens0
            self.seconds = time.perf_counter() - t0

    return RunMeter()


def _run_settings(cfg: FinetuneConfig, learning_rate: float, mode: str, records) -> dict[str, Any]:
    """What decides the trained weights: the config (less bookkeeping), the resolved learning rate,
    adapter or full training, and the data (hashed: records are strings or (prompt, answer) pairs)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _BOOKKEEPING}
    data = json.dumps(list(records), ensure_ascii=False).encode()
    settings.update(learning_rate=learning_rate, mode=mode, data_sha256=hashlib.sha256(data).hexdigest())
    return settings


def _claim_checkpoint_folder(cfg: FinetuneConfig, settings: dict[str, Any]) -> None:
    """Refuse checkpoints of another run; record this run's settings beside its checkpoints.

    Without ``resume`` an existing checkpoint would be mixed into this run (the Trainer rotates
    checkpoints by step number, so an older run's later steps would outlive this run's); with
    ``resume`` a checkpoint trained with other settings would continue as if it were this run.
    """
    folder = Path(cfg.output_dir)
    record = folder / RUN_FILE
    has_checkpoints = folder.is_dir() and any(c.is_dir() for c in folder.glob("checkpoint-*"))
    if has_checkpoints and not cfg.resume:
        raise CheckpointConflictError(
            f"{folder} already holds checkpoints of an earlier run: resume it (--resume) or remove them")
    if has_checkpoints and record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointConflictError(f"{record}: unreadable ({exc}); cannot tell which run it belongs to") from None
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        longer = [c for c in changed if c.split(":")[0] in _LENGTH]
        if longer:  # continuing a run for more (or fewer) steps is what resuming is also for
            log.warning("resuming %s with another length (%s)", folder, "; ".join(longer))
            changed = [c for c in changed if c not in longer]
        if changed:
            raise CheckpointConflictError(
                f"{folder}: its checkpoints were trained with other settings ({'; '.join(changed)}); "
                "use another checkpoint folder or remove them")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f"{RUN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    tmp.replace(record)


def _run(model: nn.Module, tokenizer, records, cfg: FinetuneConfig, learning_rate: float, callbacks,
         mode: str) -> dict[str, Any]:
    _claim_checkpoint_folder(cfg, _run_settings(cfg, learning_rate, mode, records))
    dataset = FinetuneDataset(tokenizer, records, cfg.max_length)
    meter = _meter()
    trainer = _trainer_class()(
        model=model,
        args=_training_arguments(cfg, learning_rate),
        train_dataset=dataset,
        data_collator=CausalLMCollator(pad_token_id(tokenizer)),
        callbacks=[meter, _log_before_save(), *(callbacks or [])],
        head_at_labels=HeadAtLabels(output_head(model)) if cfg.head_at_labels else None,
    )
    from transformers.trainer_callback import ProgressCallback

    if trainer.pop_callback(ProgressCallback) is not None:  # present unless the Trainer's tqdm is off
        trainer.add_callback(_labelled_progress(f"training {mode}" + (f" on {cfg.task}" if cfg.task else "")))
    checkpoint = last_checkpoint(cfg.output_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log.info("resume: no complete checkpoint in %s, starting from scratch", cfg.output_dir)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        metrics = output.metrics
    except _AlreadyFinished:  # the checkpoint's weights and log history are loaded: nothing to train
        metrics = {}
    history = [
        {k: e[k] for k in ("step", "epoch", "loss", "learning_rate", "grad_norm") if k in e}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    steps = getattr(meter, "steps", 0)
    seconds = getattr(meter, "seconds", 0.0)
    tokens = getattr(meter, "tokens", 0)
    # The Trainer's ``train_loss`` covers only this process's steps (0.0 when a finished run resumes).
    loss = run_loss(trainer.state.log_history)
    return {
        "learning_rate": learning_rate,
        "train_loss": loss if loss is not None else metrics.get("train_loss"),
        "loss_history": history,
        "steps": trainer.state.global_step,
        "steps_this_run": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps if steps else None,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "examples": len(dataset),
        "loss_tokens_per_epoch": dataset.loss_tokens,
        "data": sorted(dataset.kinds),
        # Folder names, not paths: these statistics go into the adapter's manifest (to the model owner).
        "resumed_from": checkpoint.name if checkpoint else None,
        "checkpoint": final.name if (final := last_checkpoint(cfg.output_dir)) else None,
    }


class _Frozen:
    """Make exactly ``trainable`` require grad (and ``config.use_cache`` off) for the block;
    restore the flags, the cache setting and eval mode afterwards."""

    def __init__(self, model: nn.Module, trainable: Sequence[nn.Parameter] | None):
        self.model, self.trainable = model, trainable

    def __enter__(self):
        self.flags = requiring_grad(self.model, self.trainable)
        self.flags.__enter__()
        config = getattr(self.model, "config", None)
        self.use_cache = getattr(config, "use_cache", None)
        if config is not None and self.use_cache is not None:
            config.use_cache = False
        return self

    def __exit__(self, *exc):
        self.flags.__exit__(None, None, None)
        if self.use_cache is not None:
            self.model.config.use_cache = self.use_cache
        self.model.eval()


def _finetune(model: nn.Module, tokenizer, records, cfg: FinetuneConfig, *, positions: Sequence[int],
              trainable: Sequence[nn.Parameter], full: bool, callbacks) -> tuple[nn.Module, dict[str, Any]]:
    lr = cfg.learning_rate if cfg.learning_rate is not None else default_learning_rate(cfg.task, full)
    stats: dict[str, Any] = {
        "mode": "full" if full else "adapter",
        "lora_r": cfg.lora_r,
        "adapter_positions": list(positions),
    }
    with _Frozen(model, trainable if not cfg.lora_r else []):
        if cfg.lora_r:
            peft_model = _with_lora(model, positions, cfg)  # freezes all but the LoRA matrices
            stats["trainable_parameters"] = sum(p.numel() for p in trainable_parameters(peft_model).values())
            try:
                stats.update(_run(peft_model, tokenizer, records, cfg, lr, callbacks, stats["mode"]))
            finally:
                # Fold the LoRA product into the base weights: the adapter leaves as plain tensors.
                model = peft_model.merge_and_unload()
        else:
            stats["trainable_parameters"] = sum(p.numel() for p in trainable_parameters(model).values())
            stats.update(_run(model, tokenizer, records, cfg, lr, callbacks, stats["mode"]))
    stats["config"] = {k: v for k, v in asdict(cfg).items() if k != "output_dir"}  # a local path
    return model, stats


def finetune_adapter(emulator: Emulator, tokenizer, records, cfg: FinetuneConfig, callbacks=None
                     ) -> tuple[Emulator, dict[str, Any]]:
    """Fine-tune the emulator's adapter layers on ``records`` (in place); everything else stays frozen.

    With ``cfg.lora_r > 0``, LoRA (PEFT) is put on every linear of the adapter layers only and
    merged back before returning, so ``emulator.model`` holds plain weights and
    ``gradot.artifacts.save_adapter`` exports them as usual. The model is left on the training
    device, in eval mode, with its ``requires_grad`` flags as they were. ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects. Returns the emulator and the run's statistics
    (loss history, steps, seconds, seconds per step, tokens per second, trainable parameters),
    which can be passed to ``save_adapter(..., training=stats)``.
    """
    model, stats = _finetune(
        emulator.model, tokenizer, records, cfg,
        positions=emulator.adapter_positions, trainable=emulator.adapter_parameters(), full=False,
        callbacks=callbacks,
    )
    emulator.model = model
    stats["emulator_method"] = emulator.manifest.get("method")
    return emulator, stats


def finetune_full(model: nn.Module, tokenizer, records, cfg: FinetuneConfig, callbacks=None
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune every parameter of ``model`` (decoder layers, embeddings, final norm, head): the
    Full FT upper bound. With ``cfg.lora_r > 0``, LoRA on every decoder layer's linears instead
    (merged before returning). Same statistics as ``finetune_adapter``."""
    positions = list(range(len(decoder_layers(model))))
    return _finetune(model, tokenizer, records, cfg, positions=positions,
                     trainable=list(model.parameters()), full=True, callbacks=callbacks)
