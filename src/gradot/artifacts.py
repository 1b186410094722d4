"""Emulator and adapter artifacts: safetensors + JSON manifest, validated on every load.

Layout of an emulator directory::

    config.json            the emulator's config (the base config with the emulator's depth)
    emulator.safetensors   adapter layers, compressed middle, embeddings, norm, head
    manifest.json          format, method, sizes, per-slot shapes, fingerprint, file hashes

An adapter directory holds ``adapter.safetensors`` (tensors named as in the ORIGINAL model) and
``manifest.json`` carrying the base fingerprint of the emulator it was trained on.

Nothing here ever unpickles: tensors come only from safetensors files, and every file is checked
against the manifest (hash, tensor names, dtypes, shapes, finite values) before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .emulator import FORMAT_VERSION, Emulator, Slot
from .registry import UnsupportedModelError, arch_of, decoder_layers
from .split import Split, SplitError, adapter_state_dict, fingerprint
from .surgery import renumber_layers, reshape_layer, shared_copy

MANIFEST = "manifest.json"
EMULATOR_FILE = "emulator.safetensors"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"


class ArtifactError(ValueError):
    """An artifact is malformed, tampered with, or does not fit the model it is used with."""


# ---------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    A failed command therefore leaves whatever was at ``out`` untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_tensors(folder: Path, filename: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Save tensors and return the manifest entry that pins them (hash, names, dtypes, shapes)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, folder / filename, metadata={"format": "pt"})
    return {
        "sha256": sha256_file(folder / filename),
        "tensors": {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)} for k, v in sorted(tensors.items())},
    }


def _unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared tensor stored once; ``aliases`` maps the others to it."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            aliases[name] = seen[id(t)]
        else:
            seen[id(t)] = name
            tensors[name] = t
    return tensors, aliases


def save_emulator(emulator: Emulator, out: str | os.PathLike, overwrite: bool = False) -> Path:
    tensors, aliases = _unique_state(emulator.model)
    manifest = dict(emulator.manifest)
    manifest["dtype"] = _dtype_name(next(emulator.model.parameters()).dtype)
    manifest["aliases"] = aliases
    with atomic_directory(out, overwrite) as tmp:
        emulator.model.config.to_json_file(tmp / CONFIG_FILE)
        manifest["files"] = {EMULATOR_FILE: _write_tensors(tmp, EMULATOR_FILE, tensors)}
        manifest["files"][CONFIG_FILE] = {"sha256": sha256_file(tmp / CONFIG_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    emulator.manifest = manifest
    return Path(out)


# ---------------------------------------------------------------------------------------------
# Reading and validating


def read_manifest(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (is {folder} a gradot {kind}?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if manifest.get("format") != f"gradot-{kind}":
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, expected 'gradot-{kind}'")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ArtifactError(f"{path}: no 'files' entry")
    for name in manifest["files"]:
        # A manifest may only name plain files inside its own directory.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{path}: file name {name!r} points outside the artifact directory")
    return manifest


def _check_hash(folder: Path, name: str, entry: dict) -> Path:
    path = folder / name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    if not isinstance(entry, dict) or entry.get("sha256") != sha256_file(path):
        raise ArtifactError(f"{path}: content hash does not match the manifest (modified or truncated)")
    return path


def read_tensors(folder: Path, name: str, entry: dict) -> dict[str, torch.Tensor]:
    """Load one safetensors file, refusing anything the manifest does not describe exactly."""
    path = _check_hash(folder, name, entry)
    expected = entry.get("tensors")
    if not isinstance(expected, dict):
        raise ArtifactError(f"{folder / MANIFEST}: no tensor list for {name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            extra, missing = sorted(keys - set(expected)), sorted(set(expected) - keys)
            if extra:
                raise ArtifactError(f"{path}: tensors not listed in the manifest: {', '.join(extra[:5])}")
            if missing:
                raise ArtifactError(f"{path}: tensors listed in the manifest but absent: {', '.join(missing[:5])}")
            tensors = {k: f.get_tensor(k) for k in keys}
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
    for k, t in tensors.items():
        spec = expected[k]
        if not isinstance(spec, dict) or spec.get("dtype") != _dtype_name(t.dtype) or spec.get("shape") != list(t.shape):
            raise ArtifactError(f"{path}: tensor {k} is {_dtype_name(t.dtype)}{list(t.shape)}, manifest says {spec}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor {k} contains NaN or Inf")
    return tensors


def _slots(manifest: dict, where: Path) -> list[Slot]:
    try:
        slots = [Slot(**s) for s in manifest["slots"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: malformed 'slots' ({exc})") from exc
    for pos, s in enumerate(slots):
        if s.shares is not None and not (isinstance(s.shares, int) and 0 <= s.shares < pos and slots[s.shares].shares is None):
            raise ArtifactError(f"{where}: slot {pos} shares an invalid position {s.shares!r}")
    return slots


def load_emulator(folder: str | os.PathLike, device: str = "cpu") -> Emulator:
    """Rebuild an emulator from its directory alone (no access to the original model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    manifest = read_manifest(folder, "emulator")
    where = folder / MANIFEST
    if EMULATOR_FILE not in manifest["files"] or CONFIG_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: must list {EMULATOR_FILE} and {CONFIG_FILE}")
    _check_hash(folder, CONFIG_FILE, manifest["files"][CONFIG_FILE])
    tensors = read_tensors(folder, EMULATOR_FILE, manifest["files"][EMULATOR_FILE])
    slots = _slots(manifest, where)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = arch_of(config)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{folder / CONFIG_FILE}: {exc}") from exc
    if config.num_hidden_layers != len(slots):
        raise ArtifactError(f"{where}: {len(slots)} slots but config has {config.num_hidden_layers} layers")

    dtype = getattr(torch, manifest.get("dtype", "float32"), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{where}: unknown dtype {manifest.get('dtype')!r}")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = decoder_layers(model)
    try:
        for pos, slot in enumerate(slots):
            if slot.shares is None:
                reshape_layer(layers[pos], arch, slot.ranks, slot.channels)
        for pos, slot in enumerate(slots):
            if slot.shares is not None:
                layers[pos] = shared_copy(layers[slot.shares])
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{where}: slot shapes do not fit the architecture ({exc})") from exc
    renumber_layers(layers)

    aliases = manifest.get("aliases", {})
    expected = set(model.state_dict().keys())
    if not isinstance(aliases, dict) or not set(aliases) <= expected or not set(aliases.values()) <= set(tensors):
        raise ArtifactError(f"{where}: malformed 'aliases'")
    if set(tensors) | set(aliases) != expected:
        wrong = sorted(set(tensors) - expected) or sorted(expected - set(tensors) - set(aliases))
        raise ArtifactError(f"{folder / EMULATOR_FILE}: tensors do not match the emulator architecture: {wrong[:5]}")
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{folder / EMULATOR_FILE}: {exc}") from exc
    for alias, canonical in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        c_owner, _, c_attr = canonical.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, getattr(model.get_submodule(c_owner), c_attr))
    model.to(device).eval()
    return Emulator(model, manifest)


# ---------------------------------------------------------------------------------------------
# Adapters


def save_adapter(emulator: Emulator, out: str | os.PathLike, training: dict | None = None, overwrite: bool = False) -> Path:
    """Export the emulator's adapter layers under their ORIGINAL layer indices."""
    tensors = adapter_state_dict(emulator.model, emulator.adapter_sources, emulator.adapter_positions)
    m = emulator.manifest
    manifest = {
        "format": "gradot-adapter",
        "format_version": FORMAT_VERSION,
        "model_type": m["model_type"],
        "base": {"num_layers": m["base"]["num_layers"], "fingerprint": m["base"]["fingerprint"]},
        "adapter": m["adapter"],
        "emulator": {"method": m["method"], "keep_achieved": m["size"]["keep_achieved"]},
        "training": training or {},
    }
    with atomic_directory(out, overwrite) as tmp:
        manifest["files"] = {ADAPTER_FILE: _write_tensors(tmp, ADAPTER_FILE, tensors)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)


def plug_in(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Copy a fine-tuned adapter into the original ``model`` (in place) after checking it fits.

    Refused, with the reason: an adapter for another base model (fingerprint), another layer set,
    other shapes, or tensors for layers outside the adapter.
    """
    folder = Path(adapter_dir)
    manifest = read_manifest(folder, "adapter")
    where = folder / MANIFEST
    if ADAPTER_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: must list {ADAPTER_FILE}")
    try:
        arch = arch_of(model)
        adapter = manifest["adapter"]
        k, bottom, top = int(adapter["k"]), list(adapter["bottom"]), list(adapter["top"])
        base = manifest["base"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: malformed 'adapter' or 'base' entry ({exc})") from exc
    except UnsupportedModelError as exc:
        raise ArtifactError(str(exc)) from exc
    if manifest.get("model_type") != model.config.model_type:
        raise ArtifactError(
            f"{where}: adapter is for a {manifest.get('model_type')!r} model, this model is {model.config.model_type!r}"
        )
    try:
        split = Split(len(decoder_layers(model)), k)
    except SplitError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc
    if bottom + top != split.adapter:
        raise ArtifactError(
            f"{where}: adapter holds layers {bottom + top}, this model's k={k} adapter is layers {split.adapter}"
        )
    if base.get("fingerprint") != fingerprint(model, split):
        raise ArtifactError(
            f"{where}: base-model fingerprint does not match this model (the adapter was trained on an emulator "
            "of a different model or checkpoint)"
        )
    tensors = read_tensors(folder, ADAPTER_FILE, manifest["files"][ADAPTER_FILE])
    own = adapter_state_dict(model, split.adapter)
    if set(tensors) != set(own):
        extra, missing = sorted(set(tensors) - set(own)), sorted(set(own) - set(tensors))
        raise ArtifactError(
            f"{folder / ADAPTER_FILE}: tensor names do not match the model's adapter layers "
            f"(unexpected: {extra[:3]}, missing: {missing[:3]})"
        )
    for name, t in tensors.items():
        if t.shape != own[name].shape:
            raise ArtifactError(f"{folder / ADAPTER_FILE}: {name} has shape {list(t.shape)}, model expects {list(own[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t.to(own[name].dtype))
    return model


def describe(manifest: dict[str, Any]) -> str:
    """A readable summary of an emulator or adapter manifest (``gradot info``)."""
    lines = [f"{manifest.get('format')} v{manifest.get('format_version')}  ({manifest.get('model_type')})"]
    base = manifest.get("base", {})
    lines.append(f"base: {base.get('num_layers')} layers  {base.get('name_or_path', '')}  fingerprint {str(base.get('fingerprint'))[:16]}…")
    a = manifest.get("adapter", {})
    lines.append(f"adapter: k={a.get('k')}  layers {a.get('bottom')} + {a.get('top')}")
    if manifest.get("format") == "gradot-emulator":
        size = manifest.get("size", {})
        lines.append(f"method: {manifest.get('method')}  keep requested {manifest.get('keep_requested')}  "
                     f"achieved {size.get('keep_achieved', 0):.4f}")
        lines.append(f"middle params: {size.get('middle_params_kept'):,} of {size.get('middle_params_original'):,};  "
                     f"emulator params: {size.get('emulator_params'):,};  depth {size.get('emulator_depth')}")
        for key, value in manifest.get("settings", {}).items():
            lines.append(f"  {key}: {value}")
        lines.append("slots (position: source layer, role, shapes):")
        for pos, s in enumerate(manifest.get("slots", [])):
            detail = []
            if s.get("shares") is not None:
                detail.append(f"shares weights of position {s['shares']}")
            if s.get("ranks"):
                detail.append("ranks " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in s["ranks"].items()))
            if s.get("channels") is not None:
                detail.append(f"mlp channels {s['channels']}")
            lines.append(f"  {pos:3d}: layer {s.get('source'):3d}  {s.get('role'):7s}  {'; '.join(detail)}")
    else:
        lines.append(f"trained on: {manifest.get('emulator')}  training: {manifest.get('training')}")
    for name, entry in manifest.get("files", {}).items():
        n = len(entry.get("tensors", {})) if isinstance(entry, dict) else 0
        lines.append(f"file {name}: sha256 {str(entry.get('sha256', ''))[:16]}…" + (f"  {n} tensors" if n else ""))
    return "\n".join(lines)
