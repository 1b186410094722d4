"""Checkpoints of the trainable parameters only (``trainable.safetensors``): saving, loading, finding
the newest complete one, removing them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)



#: File name of the trainable parameters inside a checkpoint folder.
TRAINABLE_FILE = "trainable.safetensors"


_TRAINER_STATE = "trainer_state.json"


#: The settings (and a hash of the data) the checkpoints in ``output_dir`` were trained with.
RUN_FILE = "gradot_run.json"


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, each shared parameter once (``named_parameters`` dedups)."""
    return {n: p for n, p in _unwrap(model).named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, folder: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the trainable parameters to ``folder/trainable.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = trainable_parameters(model)
    source = state_dict if state_dict is not None else params
    tensors, pointers = {}, set()
    for name in params:
        if name not in source:
            raise RuntimeError(f"checkpoint: trainable parameter {name} missing from the state dict to save")
        t = source[name].detach().to("cpu").contiguous()
        if t.data_ptr() in pointers:  # safetensors refuses tensors sharing memory
            t = t.clone()
        pointers.add(t.data_ptr())
        tensors[name] = t
    path = folder / TRAINABLE_FILE
    tmp = folder / f".{TRAINABLE_FILE}.tmp{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt", "content": "gradot trainable parameters"})
    os.replace(tmp, path)
    return path


def load_trainable(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy a checkpoint's trainable parameters into ``model``; names, shapes must match exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / TRAINABLE_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a gradot fine-tuning checkpoint)")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        extra, missing = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise ValueError(
            f"{path}: parameters do not match this run's trainable parameters "
            f"(unexpected: {extra[:3]}, missing: {missing[:3]}); was it written with other settings (LoRA, full)?"
        )
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if t.shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {list(t.shape)}, the model expects {list(p.shape)}")
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest COMPLETE checkpoint in ``output_dir`` (weights and trainer state written), or None."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        step = child.name.removeprefix("checkpoint-")
        if child.is_dir() and step != child.name and step.isdigit():
            if (child / TRAINABLE_FILE).is_file() and (child / _TRAINER_STATE).is_file():
                found.append((int(step), child))
    torn = []
    for _, child in sorted(found, reverse=True):
        if _readable_state(child / _TRAINER_STATE):
            if torn:
                log.warning("%s: trainer state unreadable (a write was interrupted); using %s instead",
                            ", ".join(torn), child.name)
            return child
        torn.append(child.name)
    if torn:
        log.warning("%s: trainer state unreadable (a write was interrupted); no complete checkpoint left",
                    ", ".join(torn))
    return None


def _readable_state(path: Path) -> bool:
    """A kill during the Trainer's own (non-atomic) write leaves trainer_state.json torn."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def remove_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete a run's checkpoints (``checkpoint-*`` folders and the run record) from ``output_dir``,
    and the folder itself when nothing else is left in it (nothing else is ever deleted)."""
    import shutil

    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-"):
            shutil.rmtree(child)
    (folder / RUN_FILE).unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
