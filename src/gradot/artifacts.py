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
import math
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
from .surgery import mlp_channels, renumber_layers, reshape_layer, shared_copy

MANIFEST = "manifest.json"
EMULATOR_FILE = "emulator.safetensors"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"


class ArtifactError(ValueError):
    """An artifact is malformed, tampered with, or does not fit the model it is used with.

    The message is always one line (embedded library errors are collapsed and shortened).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _why(exc: BaseException, limit: int = 300) -> str:
    """A library exception as a short one-line reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Writing


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """An output directory that exists with content is replaced only with ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    A failed command therefore leaves whatever was at ``out`` untouched.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
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


# ---------------------------------------------------------------------------------------------
# Reading and validating


def read_manifest(folder: str | os.PathLike, kind: str) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a directory")
    if path.is_symlink():  # like every file of an artifact: plain files only
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds plain files only")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (is {folder} a gradot {kind}?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({_why(exc)})") from exc
    except RecursionError as exc:  # pathologically nested JSON
        raise ArtifactError(f"{path}: not valid JSON (nested too deeply)") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    if manifest.get("format") != f"gradot-{kind}":
        raise ArtifactError(f"{path}: format is {manifest.get('format')!r}, expected 'gradot-{kind}'")
    if not _is_int(manifest.get("format_version")) or manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ArtifactError(f"{path}: no 'files' entry")
    for name in manifest["files"]:
        # A manifest may only name plain files inside its own directory.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\x00" in name:
            raise ArtifactError(f"{path}: file name {name!r} points outside the artifact directory")
    _validate_fields(manifest, kind, path)
    return manifest


# Manifest field checks, in one place: every field the loaders, ``describe`` or ``save_adapter`` use
# is checked for type and consistency here, so that later code can index the manifest freely.


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON integers; bools and floats are not


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _short(x: Any, limit: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_HEX64 = frozenset("0123456789abcdef")
#: More decoder layers than any model has: bounds what a manifest may make the loaders enumerate.
MAX_LAYERS = 10_000
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _validate_fields(m: dict[str, Any], kind: str, path: Path) -> None:
    def bad(field: str, value: Any, expected: str) -> ArtifactError:
        return ArtifactError(f"{path}: '{field}' is {_short(value)}, expected {expected}")

    for name, entry in m["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise bad(f"files.{name}", entry, "an object with a 'sha256' hash")
        tensors = entry.get("tensors", {})
        if not isinstance(tensors, dict) or not all(
            isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
            and all(_is_int(d) and d >= 0 for d in spec["shape"]) for spec in tensors.values()
        ):
            raise bad(f"files.{name}.tensors", tensors, "tensor name -> {dtype, shape of non-negative integers}")
    if not isinstance(m.get("model_type"), str) or not m["model_type"]:
        raise bad("model_type", m.get("model_type"), "a model type name")
    base = m.get("base")
    if not isinstance(base, dict):
        raise bad("base", base, "an object")
    n = base.get("num_layers")
    if not _is_int(n) or not 1 <= n <= MAX_LAYERS:
        raise bad("base.num_layers", n, f"a positive integer up to {MAX_LAYERS}")
    if "dtype" in base and base["dtype"] not in _DTYPES:
        raise bad("base.dtype", base["dtype"], f"one of {', '.join(_DTYPES)}")
    fp = base.get("fingerprint")
    if not isinstance(fp, str) or len(fp) != 64 or not set(fp) <= _HEX64:
        raise bad("base.fingerprint", fp, "a sha256 hex digest")
    adapter = m.get("adapter")
    if not isinstance(adapter, dict):
        raise bad("adapter", adapter, "an object")
    k = adapter.get("k")
    if not _is_int(k) or k < 1 or 2 * k + 1 > n:
        raise bad("adapter.k", k, f"a positive integer with 2k + 1 <= {n} layers")
    split = Split(n, k)
    for side in ("bottom", "top"):
        if adapter.get(side) != getattr(split, side):
            raise bad(f"adapter.{side}", adapter.get(side), f"{getattr(split, side)} (k={k} of {n} layers)")
    for field in ("training", "emulator", "settings", "calibration", "aliases"):
        if field in m and not isinstance(m[field], dict):
            raise bad(field, m[field], "an object")
    if kind == "emulator":
        _validate_emulator_fields(m, split, bad)


def _validate_emulator_fields(m: dict[str, Any], split: Split, bad) -> None:
    if not isinstance(m.get("method"), str):
        raise bad("method", m.get("method"), "a method name")
    if not _is_number(m.get("keep_requested")) or not 0 < m["keep_requested"] <= 1:
        raise bad("keep_requested", m.get("keep_requested"), "a number in (0, 1]")
    size = m.get("size")
    if not isinstance(size, dict):
        raise bad("size", size, "an object")
    for field in ("middle_params_original", "middle_params_kept", "emulator_params", "emulator_depth"):
        if not _is_int(size.get(field)) or size[field] < 0:
            raise bad(f"size.{field}", size.get(field), "a non-negative integer")
    kept, original = size["middle_params_kept"], size["middle_params_original"]
    if not 0 < kept <= original:
        raise bad("size.middle_params_kept", kept, f"a positive integer up to middle_params_original ({original})")
    if not _is_number(size.get("keep_achieved")) or not math.isclose(size["keep_achieved"], kept / original):
        raise bad("size.keep_achieved", size.get("keep_achieved"), "middle_params_kept / middle_params_original")
    if "dtype" in m and m["dtype"] not in _DTYPES:
        raise bad("dtype", m["dtype"], f"one of {', '.join(_DTYPES)}")
    aliases = m.get("aliases", {})
    if not all(isinstance(v, str) for v in aliases.values()):
        raise bad("aliases", aliases, "tensor name -> tensor name")

    slots = m.get("slots")
    if not isinstance(slots, list) or not 2 * split.k + 1 <= len(slots) <= MAX_LAYERS:
        raise bad("slots", slots, f"a list of {2 * split.k + 1} to {MAX_LAYERS} positions")
    middle_sources = set(split.middle)  # built once: membership per slot below
    if size["emulator_depth"] != len(slots):
        raise bad("size.emulator_depth", size["emulator_depth"], f"the number of slots ({len(slots)})")
    known = {"source", "role", "shares", "ranks", "channels"}
    middle_positions = range(split.k, len(slots) - split.k)
    for pos, s in enumerate(slots):
        where = f"slots[{pos}]"
        if not isinstance(s, dict) or not {"source", "role"} <= set(s) <= known:
            raise bad(where, s, "an object with source, role, shares, ranks, channels")
        role = "middle" if pos in middle_positions else "adapter"
        if s["role"] != role:
            raise bad(f"{where}.role", s["role"], repr(role))
        source = s["source"]
        if role == "adapter":
            expected = split.adapter[pos] if pos < split.k else split.top[pos - (len(slots) - split.k)]
            if source != expected or not _is_int(source):
                raise bad(f"{where}.source", source, f"adapter layer {expected}")
        elif not _is_int(source) or source not in middle_sources:
            raise bad(f"{where}.source", source, f"a middle layer index in [{split.k}, {split.num_layers - split.k})")
        shares = s.get("shares")
        if shares is not None and not (
            _is_int(shares) and shares in middle_positions and shares < pos and slots[shares].get("shares") is None
        ):
            raise bad(f"{where}.shares", shares, "null or an earlier middle position with its own weights")
        ranks = s.get("ranks", {})
        if not isinstance(ranks, dict) or not all(_is_int(r) and r >= 1 for r in ranks.values()):
            raise bad(f"{where}.ranks", ranks, "linear name -> positive integer rank")
        if role == "adapter" and ranks:
            raise bad(f"{where}.ranks", ranks, "{} for an adapter position (adapter layers ship uncompressed)")
        channels = s.get("channels")
        if channels is not None and (not _is_int(channels) or channels < 1):
            raise bad(f"{where}.channels", channels, "null or a positive integer")
        if shares is not None and ranks:
            raise bad(f"{where}.ranks", ranks, "{} on a position that shares another's weights")


def _check_hash(folder: Path, name: str, entry: dict) -> Path:
    path = folder / name
    if path.is_symlink():  # a link could point anywhere outside the artifact directory
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds plain files only")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    if not isinstance(entry, dict) or entry.get("sha256") != sha256_file(path):
        raise ArtifactError(f"{path}: content hash does not match the manifest (modified or truncated)")
    return path


def read_tensors(folder: Path, name: str, entry: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load one safetensors file, refusing anything the manifest does not describe exactly.

    Only floating tensors of the artifact dtypes are accepted (``dtype``: exactly that one)."""
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
        raise ArtifactError(f"{path}: not a readable safetensors file ({_why(exc)})") from exc
    for k, t in tensors.items():
        spec = expected[k]
        if not isinstance(spec, dict) or spec.get("dtype") != _dtype_name(t.dtype) or spec.get("shape") != list(t.shape):
            raise ArtifactError(f"{path}: tensor {k} is {_dtype_name(t.dtype)}{list(t.shape)}, manifest says {spec}")
        if _dtype_name(t.dtype) not in _DTYPES or (dtype is not None and t.dtype != dtype):
            wanted = _dtype_name(dtype) if dtype is not None else " or ".join(_DTYPES)
            raise ArtifactError(f"{path}: tensor {k} is {_dtype_name(t.dtype)}, expected {wanted}")
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: tensor {k} contains NaN or Inf")
    return tensors


def _slots(manifest: dict, where: Path) -> list[Slot]:
    try:
        slots = [Slot(**s) for s in manifest["slots"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: malformed 'slots' ({_why(exc)})") from exc
    for pos, s in enumerate(slots):
        if s.shares is not None and not (isinstance(s.shares, int) and 0 <= s.shares < pos and slots[s.shares].shares is None):
            raise ArtifactError(f"{where}: slot {pos} shares an invalid position {s.shares!r}")
    return slots


def _config_field_error() -> type[Exception]:
    """What transformers' strict config dataclasses raise on a field of the wrong type."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: such errors are ValueErrors
        return ValueError
    return StrictDataclassError


def _build_architecture(folder: Path, config, dtype, arch, slots: list[Slot], context) -> nn.Module:
    """The emulator's module tree from its config and slots, weights not loaded (``context``: a
    factory of the context that keeps parameters off real memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with context():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, ArithmeticError, RuntimeError) as exc:
        # Library code run on the sender's config: any of these means it describes no buildable model.
        raise ArtifactError(f"{folder / CONFIG_FILE}: does not describe a buildable model ({_why(exc)})") from exc
    layers = decoder_layers(model)
    try:
        with context():
            for pos, slot in enumerate(slots):
                if slot.role == "adapter" and slot.channels not in (None, mlp_channels(layers[pos], arch)):
                    # Adapter layers ship uncompressed: a pruned one could never be plugged back in.
                    raise ArtifactError(f"{folder / MANIFEST}: slots[{pos}] prunes an adapter layer's MLP "
                                        f"to {slot.channels} channels; adapter layers ship uncompressed")
                if slot.shares is None:
                    reshape_layer(layers[pos], arch, slot.ranks, slot.channels)
            for pos, slot in enumerate(slots):
                if slot.shares is not None:
                    layers[pos] = shared_copy(layers[slot.shares])
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
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
        data = (folder / CONFIG_FILE).read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactError(f"{path}: content hash does not match the manifest (modified or truncated)")
        raw = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not a readable JSON config ({_why(exc)})") from exc
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


def load_emulator(folder: str | os.PathLike, device: str = "cpu") -> Emulator:
    """Rebuild an emulator from its directory alone (no access to the original model)."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    manifest = read_manifest(folder, "emulator")
    where = folder / MANIFEST
    if EMULATOR_FILE not in manifest["files"] or CONFIG_FILE not in manifest["files"]:
        raise ArtifactError(f"{where}: must list {EMULATOR_FILE} and {CONFIG_FILE}")
    for name, entry in manifest["files"].items():
        if name != EMULATOR_FILE:
            _check_hash(folder, name, entry)
    dtype = getattr(torch, manifest.get("dtype", "float32"))  # one of _DTYPES (read_manifest checked)
    tensors = read_tensors(folder, EMULATOR_FILE, manifest["files"][EMULATOR_FILE], dtype=dtype)
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

    # config.json and the slots come from the sender: build their architecture on the meta device
    # first (no memory, whatever sizes the config claims) and check it against the stored tensors
    # before anything is allocated.
    skeleton = _build_architecture(folder, config, dtype, arch, slots, lambda: torch.device("meta"))
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    # Which tensors are one and the same follows from the architecture (tied embeddings, the slots'
    # layer sharing): the manifest must say exactly that, or a frozen weight could be tied to a
    # trainable one, or a shared layer shipped as two.
    sharing = _unique_state(skeleton)[1]
    del skeleton
    aliases = manifest.get("aliases", {})
    expected = set(shapes)
    if (not isinstance(aliases, dict) or not set(aliases) <= expected or not set(aliases.values()) <= set(tensors)
            or set(aliases) & set(tensors)):
        raise ArtifactError(f"{where}: malformed 'aliases' (each must map a parameter to a stored tensor)")
    if aliases != sharing:
        wrong = sorted(set(aliases.items()) ^ set(sharing.items()))
        raise ArtifactError(f"{where}: 'aliases' do not match the layer sharing of the slots and config "
                            f"(differ at {_short(wrong[:3])})")
    if set(tensors) | set(aliases) != expected:
        wrong = sorted(set(tensors) - expected) or sorted(expected - set(tensors) - set(aliases))
        raise ArtifactError(f"{folder / EMULATOR_FILE}: tensors do not match the emulator architecture: {wrong[:5]}")
    for name, t in sorted(tensors.items()):
        if t.shape != shapes[name]:
            raise ArtifactError(f"{folder / EMULATOR_FILE}: tensor {name} has shape {list(t.shape)}, the architecture "
                                f"of config.json and the manifest's slots needs {list(shapes[name])}")
    for alias, canonical in sorted(aliases.items()):
        if tensors[canonical].shape != shapes[alias]:
            raise ArtifactError(f"{where}: alias {alias} -> {canonical} joins tensors of different shapes")
    model = _build_architecture(folder, config, dtype, arch, slots, init_empty_weights)
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{folder / EMULATOR_FILE}: {_why(exc)}") from exc
    for alias, canonical in aliases.items():
        owner_name, _, attr = alias.rpartition(".")
        c_owner, _, c_attr = canonical.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, getattr(model.get_submodule(c_owner), c_attr))
    model.to(device).eval()
    return Emulator(model, manifest)


def load_emulator_tokenizer(folder: str | os.PathLike):
    """The tokenizer shipped in an emulator directory (its files are hash-checked first)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder, "emulator")
    if "tokenizer_config.json" not in manifest["files"]:
        raise ArtifactError(f"{folder}: the emulator ships no tokenizer (saved without one)")
    # transformers reads whatever tokenizer files sit in the folder (added tokens, chat templates),
    # listed or not: load from a private copy of the listed files, hash-checked after copying.
    with tempfile.TemporaryDirectory(prefix="gradot-tokenizer-") as tmp:
        for name, entry in manifest["files"].items():
            if name != EMULATOR_FILE:
                shutil.copyfile(_check_hash(folder, name, entry), Path(tmp) / name)
                try:
                    _check_hash(Path(tmp), name, entry)
                except ArtifactError as exc:
                    raise ArtifactError(f"{folder / name}: changed while being read") from exc
        if CONFIG_FILE in manifest["files"]:
            read_config(Path(tmp), shown=folder)  # refuses custom code before the tokenizer loader reads it
        tok_config = Path(tmp) / "tokenizer_config.json"
        try:
            asks_code = "auto_map" in json.loads(tok_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError) as exc:
            raise ArtifactError(f"{folder / tok_config.name}: not valid JSON ({_why(exc)})") from exc
        if asks_code:
            raise ArtifactError(f"{folder / tok_config.name}: asks for custom code (auto_map); gradot never runs it")
        try:
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
            tok("The offsite-tuning protocol.")  # a field of the wrong type may only fail on first use
        except Exception as exc:  # noqa: BLE001
            # The one place the sender's tokenizer files meet third-party parsers, and the tokenizers
            # library reports a malformed tokenizer.json as a bare Exception (TypeError, KeyError,
            # AttributeError come from transformers on wrongly typed fields).
            raise ArtifactError(f"{folder}: cannot load the shipped tokenizer ({_why(exc)})") from exc
    tok.name_or_path = str(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


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
        raise ArtifactError(f"{where}: malformed 'adapter' or 'base' entry ({_why(exc)})") from exc
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
    taken_in = getattr(torch, base.get("dtype", "float32"))  # one of _DTYPES (read_manifest checked)
    if base.get("fingerprint") != fingerprint(model, split, as_dtype=taken_in):
        raise ArtifactError(
            f"{where}: base-model fingerprint does not match this model (the adapter was trained on an emulator "
            f"of a different model or checkpoint; its fingerprint was taken in {_dtype_name(taken_in)})"
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
        converted = t.to(own[name].dtype)
        if not torch.isfinite(converted).all():  # e.g. float64 values beyond float32's range
            raise ArtifactError(f"{folder / ADAPTER_FILE}: {name} overflows the model's {_dtype_name(own[name].dtype)}")
        tensors[name] = converted
    with torch.no_grad():  # every check passed: only now is the model written
        for name, t in tensors.items():
            own[name].copy_(t)
    return model


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    # Every string here came from the sender: no terminal control sequences reach the screen.
    return "\n".join(_printable(line) for line in lines)
