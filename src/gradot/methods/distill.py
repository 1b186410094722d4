"""OT's distilled emulator: a training-free emulator (uniform layer drop by default) whose middle
layers are then trained, on public text, to make the emulator behave like the original model.

The adapter layers, embeddings, final norm and head stay frozen (they are the original's and must
stay so: the data owner's adapter is plugged back into the original). The loss, per token:

* ``hidden_weight`` x the relative squared error of the hidden state entering the top adapter
  (what the top adapter layers will see, emulator against original),
* ``kd_weight`` x KL(original || emulator) of the next-token distributions (offsite-tuning's
  ``--kd_weight``),
* ``lm_weight`` x the language-model loss on the text itself (offsite-tuning's ``--lm_weight``).

The text is the calibration text (``--calib``, public WikiText by default), cut into
``distill_batch`` sequences per step; the last batch is held back and the loss on it is recorded
before and after training. The budget is ``distill_steps`` optimizer steps, or ``distill_tokens``
training tokens if that comes first. With ``distill_checkpoint`` the trainable weights and the
optimizer state are written every ``checkpoint_every`` steps; a run with the same recipe resumes from
there and ends with the same weights as an uninterrupted one (the data order is fixed and nothing is
random). ``train_emulator`` is the trainer ScaleOT's harmonizers use too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..emulator import Emulator
from ..errors import MethodConfigError
from ..registry import decoder_layers
from ..split import Split
from .base import Calibration, MethodConfig, SimpleMethod, option

#: Methods that train on top of another one's emulator (never an ``--init``).
TRAINED = ("distill", "scaleot")


@dataclass(frozen=True)
class TrainOptions(MethodConfig):
    """How the emulator is trained: budget, losses, checkpoints (shared by distill and scaleot)."""

    distill_steps: int = option(100, "optimizer steps of emulator training (the budget; see --distill-tokens)",
                                minimum=1, metavar="N")
    distill_tokens: int | None = option(None, "stop emulator training once this many text tokens were trained "
                                        "on (default: --distill-steps alone)", kind=int, minimum=1, metavar="N")
    distill_batch: int = option(4, "sequences of calibration text per training step (the last batch of them "
                                "is held back to measure the loss)", minimum=1, metavar="N")
    hidden_weight: float = option(1.0, "weight of the hidden-state loss: relative squared error of the hidden "
                                  "state entering the top adapter, emulator against original")
    kd_weight: float = option(1.0, "weight of KL(original || emulator) on next-token distributions "
                              "(offsite-tuning's --kd_weight)")
    lm_weight: float = option(0.0, "weight of the language-model loss on the text (offsite-tuning's --lm_weight)")
    distill_checkpoint: str | None = option(None, "folder for resumable training checkpoints (a rerun with the "
                                            "same recipe resumes from it)", kind=str, metavar="DIR", runtime=True)
    checkpoint_every: int = option(25, "training steps between checkpoints (with --distill-checkpoint)",
                                   minimum=1, metavar="N", runtime=True)

    def __post_init__(self):
        if min(self.hidden_weight, self.kd_weight, self.lm_weight) < 0 or not (
                self.hidden_weight + self.kd_weight + self.lm_weight > 0):
            raise MethodConfigError("the loss weights (--hidden-weight, --kd-weight, --lm-weight) must be "
                                    "non-negative and not all zero")


@dataclass(frozen=True)
class DistillConfig(TrainOptions):
    init: str = option("uniform", "training-free method whose emulator distillation starts from "
                       "(uniform: offsite-tuning's; gradot, svd, crash, wanda: its own options' defaults)",
                       metavar="METHOD")
    distill_lr: float = option(1e-4, "learning rate (AdamW, constant) of the distilled middle layers")

    def __post_init__(self):
        super().__post_init__()
        from . import REGISTRY

        if self.init in TRAINED or (REGISTRY and self.init not in REGISTRY):
            known = ", ".join(sorted(n for n in REGISTRY if n not in TRAINED))
            raise MethodConfigError(f"--init {self.init!r}: not a training-free method (one of {known})")


def recipe(config: TrainOptions) -> dict:
    """What the manifest records of the training (runtime settings left out)."""
    return {f.name: getattr(config, f.name) for f in fields(config)
            if f.name != "keep" and not f.metadata.get("runtime")}


# ---------------------------------------------------------------------------------------------
# The loss


def _forward(model: nn.Module, ids: torch.Tensor):
    return model(input_ids=ids, output_hidden_states=True, use_cache=False)


def distillation_loss(teacher: nn.Module, emulator: Emulator, split: Split, ids: torch.Tensor,
                      config: TrainOptions, teacher_out=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of ``emulator`` against ``teacher`` (the original) on ``ids``, and its parts."""
    if teacher_out is None:
        with torch.no_grad():
            teacher_out = _forward(teacher, ids)
    out = _forward(emulator.model, ids)
    parts: dict[str, torch.Tensor] = {}
    if config.hidden_weight:
        # hidden_states[i] is the input of layer i: the top adapter's first layer.
        target = teacher_out.hidden_states[split.top[0]].float()
        got = out.hidden_states[len(decoder_layers(emulator.model)) - split.k].float()
        parts["hidden"] = (got - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
    if config.kd_weight:
        t = F.log_softmax(teacher_out.logits.float(), -1).flatten(0, -2)
        s = F.log_softmax(out.logits.float(), -1).flatten(0, -2)
        parts["kd"] = F.kl_div(s, t, log_target=True, reduction="batchmean")
    if config.lm_weight:
        logits = out.logits[:, :-1].float().flatten(0, -2)
        parts["lm"] = F.cross_entropy(logits, ids[:, 1:].flatten().to(logits.device))
    weights = {"hidden": config.hidden_weight, "kd": config.kd_weight, "lm": config.lm_weight}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def heldout_loss(teacher, emulator, split, batches, config) -> float:
    with torch.no_grad():
        return sum(float(distillation_loss(teacher, emulator, split, b, config)[0]) for b in batches) / len(batches)


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON only (nothing is unpickled on resume)

_STATE, _TENSORS = "state.json", "state.safetensors"


def _recipe_key(config: TrainOptions, emulator: Emulator, params: list[nn.Parameter]) -> str:
    h = hashlib.sha256(json.dumps({"recipe": recipe(config), "keep": config.keep,
                                   "base": emulator.manifest["base"]["fingerprint"],
                                   "slots": emulator.manifest["slots"]}, sort_keys=True, default=str).encode())
    for p in params:  # the starting weights: a checkpoint of another start is not resumed
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _save_checkpoint(folder: Path, key: str, step: int, tokens: int, params, opt) -> None:
    from safetensors.torch import save_file

    tensors = {f"param.{i}": p.detach().contiguous().cpu() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                tensors[f"{name}.{i}"] = st[name].contiguous().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / _TENSORS))
    (tmp / _STATE).write_text(json.dumps({"key": key, "step": step, "tokens": tokens}))
    for name in (_TENSORS, _STATE):  # tensors first: a state.json always has its tensors
        os.replace(tmp / name, folder / name)
    tmp.rmdir()


def _load_checkpoint(folder: Path, key: str, params, opt) -> tuple[int, int]:
    """(step, tokens) of the checkpoint in ``folder`` (0, 0 if none); weights and optimizer restored."""
    from safetensors.torch import load_file

    if not (folder / _STATE).exists():
        return 0, 0
    state = json.loads((folder / _STATE).read_text())
    if state.get("key") != key:
        raise MethodConfigError(f"{folder}: holds a checkpoint of another training recipe or starting emulator "
                                "(remove it, or pass another --distill-checkpoint)")
    tensors = load_file(str(folder / _TENSORS))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    step = int(state["step"])
    for i, p in enumerate(params):
        if f"exp_avg.{i}" in tensors:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": tensors[f"exp_avg.{i}"].to(p.device),
                            "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].to(p.device)}
    return step, int(state["tokens"])


# ---------------------------------------------------------------------------------------------
# The trainer

#: Called as ``_after_step(step)`` after every step and checkpoint (tests interrupt training here).
_after_step = None


def training_batches(calibration: Calibration, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The calibration sequences in batches of ``batch``: (training batches, held-back batches)."""
    seqs = torch.cat([b for b in calibration.batches], 0)
    batches = list(seqs.split(batch))
    if len(batches) < 2:
        return batches, batches  # too little text to hold any back: the loss is measured on the training text
    return batches[:-1], batches[-1:]


def train_emulator(teacher: nn.Module, emulator: Emulator, split: Split, params: list[nn.Parameter],
                   calibration: Calibration, config: TrainOptions, lr: float, desc: str) -> dict:
    """Train ``params`` (parameters of ``emulator``'s middle) to make ``emulator`` match ``teacher``;
    everything else in the emulator is frozen. Returns what the manifest records of the run."""
    from tqdm.auto import tqdm

    if calibration is None:
        raise MethodConfigError("emulator training needs calibration text")
    train, held = training_batches(calibration, config.distill_batch)
    device = next(emulator.model.parameters()).device
    train = [b.to(device) for b in train]
    held = [b.to(device) for b in held]
    trainable = {id(p) for p in params}
    for p in emulator.model.parameters():
        p.requires_grad_(id(p) in trainable)
    teacher.eval()
    emulator.model.eval()  # no dropout: the run is deterministic, so a resumed one ends where this one would
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = heldout_loss(teacher, emulator, split, held, config)
    folder = Path(config.distill_checkpoint) if config.distill_checkpoint else None
    key = _recipe_key(config, emulator, params) if folder else ""
    step, tokens = _load_checkpoint(folder, key, params, opt) if folder else (0, 0)
    resumed_at = step
    budget = config.distill_tokens or math.inf
    start = time.perf_counter()
    bar = tqdm(total=config.distill_steps, initial=step, desc=desc, leave=False, disable=None)
    last: dict[str, float] = {}
    try:
        while step < config.distill_steps and tokens < budget:
            ids = train[step % len(train)]
            loss, last = distillation_loss(teacher, emulator, split, ids, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tokens += ids.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if folder and (step % config.checkpoint_every == 0 or step == config.distill_steps or tokens >= budget):
                _save_checkpoint(folder, key, step, tokens, params, opt)
            if _after_step is not None:
                _after_step(step)
    finally:
        bar.close()
        for p in emulator.model.parameters():
            p.requires_grad_(True)
    after = heldout_loss(teacher, emulator, split, held, config)
    return {
        "recipe": recipe(config), "lr": lr, "steps": step, "tokens": tokens, "resumed_at_step": resumed_at,
        "trained_params": sum(p.numel() for p in params),
        "heldout": {"sequences": sum(b.shape[0] for b in held), "held_back": held is not train,
                    "loss_before": before, "loss_after": after, "last_step_parts": last},
        "seconds": round(time.perf_counter() - start, 1),
    }


def middle_parameters(emulator: Emulator) -> list[nn.Parameter]:
    """The emulator's middle-layer parameters, each once (layers sharing weights train them once)."""
    layers = decoder_layers(emulator.model)
    seen, out = set(), []
    for pos, slot in enumerate(emulator.slots):
        if slot.role == "middle":
            for p in layers[pos].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def distill_emulator(model: nn.Module, split: Split, config: DistillConfig, calibration: Calibration | None):
    from . import get, make_config

    init = get(config.init)
    init_config = make_config(init.config, config.keep, {})
    start = time.perf_counter()
    emulator = init.build(model, split, init_config, calibration if init.needs_calibration else None)
    init_seconds = time.perf_counter() - start
    run = train_emulator(model, emulator, split, middle_parameters(emulator), calibration, config,
                         config.distill_lr, "distill")
    emulator.manifest["method"] = "distill"
    emulator.manifest["settings"] = {"init": {"method": config.init, "settings": emulator.manifest["settings"],
                                              "seconds": round(init_seconds, 1)},
                                     "training": run}
    return emulator


METHOD = SimpleMethod("distill", "OT's distilled emulator: a training-free one (--init) with its middle trained to "
                      "match the original", DistillConfig, True, distill_emulator)

__all__ = ["DistillConfig", "METHOD", "TrainOptions", "distillation_loss", "heldout_loss", "middle_parameters",
           "recipe", "train_emulator", "training_batches"]
