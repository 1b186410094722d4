"""Emulators on disk: writing one, and loading one (config read safely, the architecture rebuilt
from the manifest's shapes, weights checked before use); ``verify`` for ``gradot info``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..emulator import Emulator, Slot
from ..errors import ArtifactError
from ..registry import UnsupportedModelError, arch_of, decoder_layers
from ..slot_kinds import check_slots
from ..surgery import layer_widths, renumber_layers, reshape_layer, shared_copy
from .files import ADAPTER_FILE, CONFIG_FILE, EMULATOR_FILE, MANIFEST, MAX_SMALL_FILE_BYTES, _check_hash, _check_header, _dtype_name, _parse_json, _read_bounded, _short, _why, _write_tensors, atomic_directory, check_listed_files, read_tensors, sha256_file
from .manifest import _slots, read_manifest


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


def save_emulator(emulator: Emulator, out: str | os.PathLike, overwrite: bool = False, tokenizer=None) -> Path:
    """Write the emulator (and the base model's tokenizer, which the data owner needs) to ``out``."""
    tensors, aliases = _unique_state(emulator.model)
    manifest = dict(emulator.manifest)
    manifest["dtype"] = _dtype_name(next(emulator.model.parameters()).dtype)
    manifest["aliases"] = aliases
    with atomic_directory(out, overwrite) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # JSON/text files only, hashed below like everything else
        emulator.model.config.to_json_file(tmp / CONFIG_FILE)
        manifest["files"] = {EMULATOR_FILE: _write_tensors(tmp, EMULATOR_FILE, tensors)}
        for path in sorted(tmp.iterdir()):
            if path.name not in manifest["files"]:
                manifest["files"][path.name] = {"sha256": sha256_file(path)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    emulator.manifest = manifest
    return Path(out)


def _config_field_error() -> type[Exception]:
    """What transformers' strict config dataclasses raise on a field of the wrong type."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: such errors are ValueErrors
        return ValueError
    return StrictDataclassError


def _check_slot_bounds(folder: Path, layers, arch, slots: list[Slot], middle: range) -> None:
    """Every slot's stated shapes and span against the widths the config gives its position (the
    layers as built from the config alone, on the meta device), by the check of the slot's kind."""
    # The modules building the kinds of slots beyond kept and adapter layers register their bounds
    # when imported (those modules only: the methods package as a whole imports this one back).
    from ..methods.crash import SHARED_SLOT  # noqa: F401
    from ..methods.harmonizers import HARMONIZER_SLOT  # noqa: F401

    problem = check_slots(slots, [layer_widths(layer, arch) for layer in layers], middle)
    if problem is not None:
        field, value, expected = problem
        raise ArtifactError(f"{folder / MANIFEST}: '{field}' is {_short(value)}, expected {expected}")


def _build_architecture(folder: Path, config, dtype, arch, slots: list[Slot], context, middle: range) -> nn.Module:
    """The emulator's module tree from its config and slots, weights not loaded (``context``: a
    factory of the context that keeps parameters off real memory; ``middle``: the base's middle
    layers). The slots' shapes are checked against the config's widths before any is built."""
    from transformers import AutoModelForCausalLM

    try:
        with context():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, ArithmeticError, RuntimeError) as exc:
        # Library code run on the sender's config: any of these means it describes no buildable model.
        raise ArtifactError(f"{folder / CONFIG_FILE}: does not describe a buildable model ({_why(exc)})") from exc
    layers = decoder_layers(model)
    _check_slot_bounds(folder, layers, arch, slots, middle)
    try:
        with context():
            for pos, slot in enumerate(slots):
                if slot.shares is None:
                    reshape_layer(layers[pos], arch, slot.ranks, slot.channels)
            for pos, slot in enumerate(slots):
                if slot.shares is not None:
                    layers[pos] = shared_copy(layers[slot.shares])
    except (AttributeError, TypeError, ValueError, RuntimeError, ArithmeticError) as exc:  # 400-digit channels
        raise ArtifactError(f"{folder / MANIFEST}: slot shapes do not fit the architecture ({_why(exc)})") from exc
    renumber_layers(layers)
    return model


#: Attention implementations a shipped config may ask for: built into torch and transformers. Others
#: import optional packages or fetch kernels from a hub.
_ATTENTION = (None, "eager", "sdpa")


def read_config(folder: Path, shown: Path | None = None, sha256: str | None = None):
    """The shipped ``config.json`` as a transformers config, without ever running the sender's code.

    The class comes from transformers' own mapping for ``model_type``; ``auto_map`` (custom code),
    and attention implementations beyond eager/SDPA are refused outright. Errors name ``shown``
    (the artifact folder, when ``folder`` is a private copy of it). ``sha256``: the manifest's hash,
    checked on the very bytes parsed (the file cannot change between the check and the use).
    """
    from transformers import CONFIG_MAPPING

    path = (shown or folder) / CONFIG_FILE
    try:
        data = _read_bounded(folder / CONFIG_FILE, MAX_SMALL_FILE_BYTES)
    except ArtifactError as exc:  # named as the artifact's file, not the private copy's
        raise ArtifactError(str(exc).replace(str(folder / CONFIG_FILE), str(path))) from exc
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{path}: content hash does not match the manifest (modified or truncated)")
    raw = _parse_json(data, path, "a readable JSON config")
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise ArtifactError(f"{path}: asks for custom code (auto_map / trust_remote_code); gradot never runs it")
    for key in ("attn_implementation", "_attn_implementation"):
        if raw.get(key) not in _ATTENTION:
            raise ArtifactError(f"{path}: {key} {_short(raw.get(key))} is not one of eager, sdpa")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ArtifactError(f"{path}: unknown model_type {_short(model_type)}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, _config_field_error()) as exc:
        raise ArtifactError(f"{path}: {_why(exc)}") from exc


def _checked_emulator(folder: Path):
    """Every check of an emulator that reads no tensor data: the manifest, every listed file's hash,
    the config, and the manifest's tensor list against the architecture built on the meta device
    (no memory, whatever sizes the config claims). Returns what building it needs."""
    manifest = read_manifest(folder, "emulator")
    where = folder / MANIFEST
    if EMULATOR_FILE not in manifest["files"] or CONFIG_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: must list {EMULATOR_FILE} and {CONFIG_FILE}")
    check_listed_files(folder, manifest, skip=(EMULATOR_FILE,))  # read_tensors hashes that one
    dtype = getattr(torch, manifest.get("dtype", "float32"))  # one of _DTYPES (read_manifest checked)
    slots = _slots(manifest, where)
    config = read_config(folder, sha256=manifest["files"][CONFIG_FILE]["sha256"])
    if config.model_type != manifest["model_type"]:
        raise ArtifactError(f"{folder / CONFIG_FILE}: model type {config.model_type!r}, manifest says {manifest['model_type']!r}")
    try:
        arch = arch_of(config)
    except UnsupportedModelError as exc:
        raise ArtifactError(f"{folder / CONFIG_FILE}: {exc}") from exc
    if config.num_hidden_layers != len(slots):
        raise ArtifactError(f"{where}: {len(slots)} slots but config has {config.num_hidden_layers} layers")
    middle = range(manifest["adapter"]["k"], manifest["base"]["num_layers"] - manifest["adapter"]["k"])
    skeleton = _build_architecture(folder, config, dtype, arch, slots, lambda: torch.device("meta"), middle)
    shapes = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    # Which tensors are one and the same follows from the architecture (tied embeddings, the slots'
    # layer sharing): the manifest must say exactly that, or a frozen weight could be tied to a
    # trainable one, or a shared layer shipped as two.
    _check_tensor_list(folder, manifest, shapes, _unique_state(skeleton)[1])
    return manifest, config, arch, slots, dtype, middle


def load_emulator(folder: str | os.PathLike, device: str = "cpu") -> Emulator:
    """Rebuild an emulator from its directory alone (no access to the original model)."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    # Everything is checked before a byte of tensor data is read: a listed, hash-correct extra
    # tensor of any size is refused without being loaded.
    manifest, config, arch, slots, dtype, middle = _checked_emulator(folder)
    tensors = read_tensors(folder, EMULATOR_FILE, manifest["files"][EMULATOR_FILE], dtype=dtype)
    model = _build_architecture(folder, config, dtype, arch, slots, init_empty_weights, middle)
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{folder / EMULATOR_FILE}: {_why(exc)}") from exc
    for alias, canonical in manifest.get("aliases", {}).items():
        owner_name, _, attr = alias.rpartition(".")
        c_owner, _, c_attr = canonical.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, getattr(model.get_submodule(c_owner), c_attr))
    model.to(device).eval()
    return Emulator(model, manifest)


def verify(folder: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Check an emulator or adapter as far as possible without loading weights or the base model
    (``gradot info``); returns the manifest and one line saying what was checked."""
    folder = Path(folder)
    if read_manifest(folder).get("format") == "gradot-emulator":
        manifest = _checked_emulator(folder)[0]
        main_file, later = EMULATOR_FILE, "as listed and as config.json and the slots need (values are checked when loaded)"
    else:
        manifest = read_manifest(folder, "adapter")
        if ADAPTER_FILE not in manifest["files"]:
            raise ArtifactError(f"{folder / MANIFEST}: must list {ADAPTER_FILE}")
        check_listed_files(folder, manifest, skip=(ADAPTER_FILE,))
        main_file, later = ADAPTER_FILE, "as listed (values, fingerprint and layer set are checked at plug-in)"
    path = _check_hash(folder, main_file, manifest["files"][main_file])
    listed = manifest["files"][main_file].get("tensors")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{folder / MANIFEST}: no tensor list for {main_file}")
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_header(path, f, listed, None)
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_why(exc)})") from exc
    return manifest, (f"verified: {len(manifest['files'])} listed files present with matching sha256; "
                      f"{len(listed)} tensors {later}")


def _check_tensor_list(folder: Path, manifest: dict, shapes: dict[str, list[int]], sharing: dict[str, str]) -> None:
    """The emulator's listed tensors and aliases against the architecture's names, shapes and sharing."""
    where = folder / MANIFEST
    listed = manifest["files"][EMULATOR_FILE].get("tensors")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{where}: no tensor list for {EMULATOR_FILE}")
    aliases = manifest.get("aliases", {})
    expected = set(shapes)
    if (not isinstance(aliases, dict) or not set(aliases) <= expected or not set(aliases.values()) <= set(listed)
            or set(aliases) & set(listed)):
        raise ArtifactError(f"{where}: malformed 'aliases' (each must map a parameter to a stored tensor)")
    if aliases != sharing:
        wrong = sorted(set(aliases.items()) ^ set(sharing.items()))
        raise ArtifactError(f"{where}: 'aliases' do not match the layer sharing of the slots and config "
                            f"(differ at {_short(wrong[:3])})")
    if set(listed) | set(aliases) != expected:
        wrong = sorted(set(listed) - expected) or sorted(expected - set(listed) - set(aliases))
        raise ArtifactError(f"{folder / EMULATOR_FILE}: tensors do not match the emulator architecture: {wrong[:5]}")
    for name, spec in sorted(listed.items()):
        if spec["shape"] != shapes[name]:
            raise ArtifactError(f"{folder / EMULATOR_FILE}: tensor {name} has shape {spec['shape']}, the architecture "
                                f"of config.json and the manifest's slots needs {shapes[name]}")
    for alias, canonical in sorted(aliases.items()):
        if listed[canonical]["shape"] != shapes[alias]:
            raise ArtifactError(f"{where}: alias {alias} -> {canonical} joins tensors of different shapes")
