"""Adapters on disk, and plugging one in: into the original model (the model owner's own split
decides which layers) or into the emulator it was trained on; every tensor checked first."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..emulator import FORMAT_VERSION, Emulator
from ..errors import ArtifactError, printable
from ..registry import UnsupportedModelError, arch_of, decoder_layers
from ..split import Split, adapter_state_dict, fingerprint
from .files import ADAPTER_FILE, MANIFEST, _dtype_name, _short, _write_tensors, atomic_directory, check_listed_files, logger, read_tensors
from .manifest import read_manifest


def save_adapter(emulator: Emulator, out: str | os.PathLike, training: dict | None = None, overwrite: bool = False) -> Path:
    """Export the emulator's adapter layers under their ORIGINAL layer indices."""
    tensors = adapter_state_dict(emulator.model, emulator.adapter_sources, emulator.adapter_positions)
    m = emulator.manifest
    manifest = {
        "format": "gradot-adapter",
        "format_version": FORMAT_VERSION,
        "model_type": m["model_type"],
        # The dtype the fingerprint was taken in (the model's when it was compressed).
        "base": {"num_layers": m["base"]["num_layers"], "fingerprint": m["base"]["fingerprint"],
                 "dtype": m.get("dtype", "float32")},
        "adapter": m["adapter"],
        "emulator": {"method": m["method"], "keep_achieved": m["size"]["keep_achieved"]},
        "training": training or {},
    }
    with atomic_directory(out, overwrite) as tmp:
        manifest["files"] = {ADAPTER_FILE: _write_tensors(tmp, ADAPTER_FILE, tensors)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)


#: Relative change ||new - original|| / ||original|| of an adapter tensor beyond which fine-tuning is
#: not a plausible cause: above it, an adapter is plugged with a warning when the bound is off.
PLAUSIBLE_CHANGE = 1.0


#: The default bound on that relative change: an adapter (or a federated update) with a tensor moved
#: further is refused (``max_change``; ``--max-change``; 0 or None turn the bound off). Honest
#: fine-tuning of the default model moves adapter tensors by about 0.05 at the default recipe; the
#: largest honest change measured anywhere is 3.7, a near-zero bias of a random tiny test model
#: trained at a high learning rate (docs/privacy.md, results/adapter-change/).
DEFAULT_MAX_CHANGE = 10.0


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old|| / ||old||`` in float64 (``old``'s norm floored at 1e-12)."""
    old = old.detach().to("cpu", torch.float64)
    return float((new.detach().to("cpu", torch.float64) - old).norm() / old.norm().clamp_min(1e-12))


def change_refusal(name: str, ratio: float, max_change: float | None = DEFAULT_MAX_CHANGE) -> str | None:
    """Why a tensor ``name`` that moved ``ratio`` times its original norm is refused under
    ``max_change`` (0 or None: never), as one line; None when it is within the bound. The one bound
    ``plug_in``, ``plug_into_emulator`` and the federation's aggregate share."""
    if not max_change or ratio <= max_change:
        return None
    return (f"{name} moved {ratio:.3g}x its original norm, more than the allowed {max_change:g}x "
            f"(no plausible fine-tuning does that; --max-change R sets the bound, 0 turns it off)")


def _checked_adapter(folder: Path, *, model_type: str, split: Split, owner: str, fingerprint_of,
                     own: dict[str, torch.Tensor], max_change: float | None) -> dict[str, torch.Tensor]:
    """The adapter's tensors, converted to ``own``'s dtypes, after every check: the one gate for
    plugging an adapter into the original model and into an emulator.

    ``split``: the split the receiver chose (never the one the adapter claims; ``owner`` names it in
    errors); ``fingerprint_of(dtype)``: the receiver's base fingerprint taken in ``dtype``; ``own``:
    the receiver's current adapter tensors, named as in the original model.
    """
    manifest = read_manifest(folder, "adapter")
    where = folder / MANIFEST
    if ADAPTER_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: must list {ADAPTER_FILE}")
    check_listed_files(folder, manifest, skip=(ADAPTER_FILE,))  # read_tensors hashes that one
    if manifest["model_type"] != model_type:
        raise ArtifactError(f"{where}: adapter is for a {manifest['model_type']!r} model, this model is {model_type!r}")
    claimed = manifest["adapter"]
    layers = claimed["bottom"] + claimed["top"]
    if claimed["k"] != split.k:
        raise ArtifactError(f"{where}: adapter claims k={claimed['k']} (layers {_short(layers)}), {owner} is "
                            f"k={split.k} (layers {split.adapter}); only those layers may be replaced")
    if layers != split.adapter:
        raise ArtifactError(f"{where}: adapter holds layers {_short(layers)}, this model's k={split.k} adapter is "
                            f"layers {split.adapter}")
    taken_in = getattr(torch, manifest["base"].get("dtype", "float32"))  # one of _DTYPES (read_manifest checked)
    if manifest["base"]["fingerprint"] != fingerprint_of(taken_in):
        raise ArtifactError(
            f"{where}: base-model fingerprint does not match this model (the adapter was trained on an emulator "
            f"of a different model or checkpoint; its fingerprint was taken in {_dtype_name(taken_in)})"
        )
    entry = manifest["files"][ADAPTER_FILE]
    _check_adapter_list(folder, entry.get("tensors"), own)  # before any tensor data is read
    tensors = read_tensors(folder, ADAPTER_FILE, entry)
    for name, t in tensors.items():
        converted = t.to(own[name].dtype)
        if not torch.isfinite(converted).all():  # e.g. float64 values beyond float32's range
            raise ArtifactError(f"{folder / ADAPTER_FILE}: {name} overflows the model's {_dtype_name(own[name].dtype)}")
        tensors[name] = converted
    _check_change(folder, tensors, own, max_change)
    return tensors


def _check_adapter_list(folder: Path, listed: Any, own: dict[str, torch.Tensor]) -> None:
    path = folder / ADAPTER_FILE
    if not isinstance(listed, dict):
        raise ArtifactError(f"{folder / MANIFEST}: no tensor list for {ADAPTER_FILE}")
    if set(listed) != set(own):
        extra, missing = sorted(set(listed) - set(own)), sorted(set(own) - set(listed))
        raise ArtifactError(f"{path}: tensor names do not match the model's adapter layers "
                            f"(unexpected: {extra[:3]}, missing: {missing[:3]})")
    for name, spec in sorted(listed.items()):
        if spec["shape"] != list(own[name].shape):
            raise ArtifactError(f"{path}: {name} has shape {spec['shape']}, model expects {list(own[name].shape)}")


def _check_change(folder: Path, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                  max_change: float | None) -> None:
    """Refuse weights moved further than ``max_change`` times their norm (or, with the bound off, warn
    above what fine-tuning plausibly does)."""
    worst, ratio = max(((name, relative_change(tensors[name], own[name])) for name in tensors),
                       key=lambda item: item[1])
    refusal = change_refusal(worst, ratio, max_change)
    if refusal is not None:
        raise ArtifactError(f"{folder / ADAPTER_FILE}: {refusal}")
    if ratio > PLAUSIBLE_CHANGE:
        logger.warning("%s", printable(f"warning: {folder / ADAPTER_FILE}: {worst} moved {ratio:.3g}x its original "
                                       f"norm; no plausible fine-tuning does that (check the adapter's origin)"))


#: Tokens of the probe a plugged model must give finite logits on.
PROBE_TOKENS = 16


def _finite_logits(model: nn.Module) -> bool:
    """Whether ``model`` gives finite logits on a short probe (token ids spread over its vocabulary)."""
    embeddings = model.get_input_embeddings()
    ids = (torch.arange(PROBE_TOKENS) * 7919 % embeddings.num_embeddings)[None].to(embeddings.weight.device)
    with torch.no_grad():
        return bool(torch.isfinite(model(input_ids=ids, use_cache=False).logits).all())


def _install(folder: Path, model: nn.Module, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the checked tensors into the model, then probe it: an adapter whose plugged model gives
    non-finite logits is refused, and the model's own adapter layers are put back."""
    with torch.no_grad():  # every check passed: only now is the model written
        originals = {name: t.detach().clone() for name, t in own.items()}
        for name, t in tensors.items():
            own[name].copy_(t)
        if _finite_logits(model):
            return
        for name, t in originals.items():
            own[name].copy_(t)
    raise ArtifactError(f"{folder / ADAPTER_FILE}: the model with this adapter plugged in gives non-finite logits "
                        f"on a {PROBE_TOKENS}-token probe (NaN or Inf); nothing was plugged in")


def plug_in(model: nn.Module, adapter_dir: str | os.PathLike, k: int = 2,
            max_change: float | None = DEFAULT_MAX_CHANGE) -> nn.Module:
    """Copy a fine-tuned adapter into the original ``model`` (in place) after checking it fits.

    ``k`` is the split the model owner compressed with (``compress --adapter-layers``; default 2, or
    ``emulator_split(emulator_dir)``): only its 2k layers are ever replaced, whatever the adapter
    claims. Refused, with the reason: an adapter for another base model (fingerprint), another split
    or layer set, other tensor names or shapes, missing or modified listed files, values that
    overflow the model's dtype, a tensor moved more than ``max_change`` times its original norm
    (default ``DEFAULT_MAX_CHANGE``; 0 or None: no bound, a warning above ``PLAUSIBLE_CHANGE``), or
    a plugged model whose logits on a short probe are not finite (the model is then left as it was).
    """
    folder = Path(adapter_dir)
    try:
        arch_of(model)
    except UnsupportedModelError as exc:
        raise ArtifactError(str(exc)) from exc
    split = Split(len(decoder_layers(model)), k)
    own = adapter_state_dict(model, split.adapter)
    tensors = _checked_adapter(folder, model_type=model.config.model_type, split=split,
                               owner="the model owner's split", own=own, max_change=max_change,
                               fingerprint_of=lambda dtype: fingerprint(model, split, as_dtype=dtype))
    _install(folder, model, own, tensors)
    return model


def plug_into_emulator(emulator: Emulator, adapter_dir: str | os.PathLike,
                       max_change: float | None = DEFAULT_MAX_CHANGE) -> None:
    """Load an adapter into the emulator it was trained on, with exactly ``plug_in``'s checks (the
    split and fingerprint are the emulator's)."""
    m = emulator.manifest
    split = Split(m["base"]["num_layers"], m["adapter"]["k"])
    own = adapter_state_dict(emulator.model, emulator.adapter_sources, emulator.adapter_positions)
    tensors = _checked_adapter(Path(adapter_dir), model_type=m["model_type"], split=split,
                               owner="the emulator's split", own=own, max_change=max_change,
                               fingerprint_of=lambda dtype: m["base"]["fingerprint"])
    _install(Path(adapter_dir), emulator.model, own, tensors)
