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

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import ArtifactError, printable  # noqa: F401  (re-exported: callers import them from here)
from .emulator import FORMAT_VERSION, Emulator, Slot
from .registry import UnsupportedModelError, arch_of, decoder_layers
from .split import Split, SplitError, adapter_state_dict, fingerprint
from .surgery import mlp_channels, renumber_layers, reshape_layer, shared_copy

MANIFEST = "manifest.json"
EMULATOR_FILE = "emulator.safetensors"
ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "config.json"

logger = logging.getLogger(__name__)


def _why(exc: BaseException, limit: int = 300) -> str:
    """A library exception as a short one-line reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Writing


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """An output directory that exists (even empty: a mistyped path is not written into silently) is
    replaced only with ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        what = "is an empty folder" if out.is_dir() and not any(out.iterdir()) else "already exists"
        raise ArtifactError(f"{out}: {what} (pass --overwrite to replace it)")


# Temporaries next to ``out``: ``.<name>.tmp-*`` (being written), ``.<name>.old-*`` (the replaced copy
# on systems without rename-exchange), ``.<name>.lock``. Names from earlier versions: ``.<name>.old<pid>``
# and ``.<name>.<8 random characters>``.
def _temporary(out: Path) -> re.Pattern:
    return re.compile(re.escape(f".{out.name}.") + r"(tmp-.+|old-.+|old\d+|[a-z0-9_]{8})")


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the system or the file system does not offer it."""
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out`` so that a kill at any instant leaves the old or the new copy at ``out``."""
    if not (out.exists() or out.is_symlink()):
        if not _renameat2(tmp, out, _RENAME_NOREPLACE):
            os.rename(tmp, out)
        return
    if _renameat2(tmp, out, _RENAME_EXCHANGE):  # one atomic step: ``tmp`` now holds the old copy
        _remove(tmp)
        return
    # No rename-exchange: the old copy waits under .old-* until the new one is in place; a run
    # killed in between leaves no ``out``, and the next claim of ``out`` puts the old copy back.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


def _recover(out: Path) -> None:
    """Restore a copy left under .old-* by a run killed between its two renames; drop other temporaries."""
    pattern = _temporary(out)
    stale = sorted((p for p in out.parent.iterdir() if pattern.fullmatch(p.name)), key=lambda p: p.lstat().st_mtime)
    olds = [p for p in stale if p.name.startswith(f".{out.name}.old-")]
    if olds and not (out.exists() or out.is_symlink()):
        os.rename(olds[-1], out)
        logger.warning("%s: restored the previous copy left by an interrupted run", out)
        stale.remove(olds[-1])
    for path in stale:
        _remove(path)


_claimed: set[Path] = set()  # outputs this process holds the lock of


@contextmanager
def claim_output(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out`` for one writer for the whole block: a second gradot process writing the same
    ``out`` is refused at once (not silently replaced at the end). Stale temporaries of killed runs
    are cleaned, and an existing ``out`` is refused unless ``overwrite``."""
    out = Path(out).absolute()
    if out in _claimed:
        yield out
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise ArtifactError(f"{lock}: cannot create the lock of {out.name} ({_why(exc)})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(f"{out}: another gradot process is writing it (lock {lock.name})") from None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break  # the lock file is still the one in place (not unlinked by a finishing writer)
        except FileNotFoundError:
            pass
        os.close(fd)
    _claimed.add(out)
    try:
        _recover(out)
        refuse_existing(out, overwrite)
        yield out
    finally:
        _claimed.discard(out)
        lock.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    A failed or killed command therefore leaves whatever was at ``out`` untouched.
    """
    with claim_output(out, overwrite) as out:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            refuse_existing(out, overwrite)  # something other than gradot may have written it meanwhile
            _replace(tmp, out)
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


#: Caps on what a sender's file may make the receiver read into memory. A manifest of the deepest
#: model allowed (MAX_LAYERS) with every tensor listed stays far below its cap; tokenizer files of
#: public models reach ~35 MB.
MAX_MANIFEST_BYTES = 4 << 20
MAX_SMALL_FILE_BYTES = 64 << 20


def _open_plain(path: Path) -> int:
    """A read descriptor of the regular file at ``path``: never through a symbolic link, and never
    a device or FIFO (which could be read forever or block)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({_why(exc)})") from exc
    if stat.S_ISLNK(st.st_mode):  # a link could point anywhere outside the artifact directory
        raise ArtifactError(f"{path}: is a symbolic link; an artifact holds plain files only")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags) if stat.S_ISREG(st.st_mode) else -1
    except OSError as exc:  # replaced by a link or a FIFO since the lstat
        raise ArtifactError(f"{path}: cannot be read as a plain file ({_why(exc)})") from exc
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise ArtifactError(f"{path}: not a plain file (a directory, device or FIFO); an artifact holds plain files only")
    return fd


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a plain file of at most ``limit`` bytes (the size is checked before reading)."""
    fd = _open_plain(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ArtifactError(f"{path}: {size:,} bytes, more than the {limit:,} such a file may have")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while being read
                raise ArtifactError(f"{path}: more than the {limit:,} bytes such a file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_json(data: bytes, path: Path, what: str = "valid JSON") -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not {what} ({_why(exc)})") from exc
    except ValueError as exc:  # JSONDecodeError, and integers beyond Python's digit limit
        raise ArtifactError(f"{path}: not {what} ({_why(exc)})") from exc
    except RecursionError as exc:  # pathologically nested JSON
        raise ArtifactError(f"{path}: not {what} (nested too deeply)") from exc


def _manifest_json(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a directory")
    if not (path.exists() or path.is_symlink()):
        raise ArtifactError(f"{path}: missing (is {folder} a gradot artifact?)")
    manifest = _parse_json(_read_bounded(path, MAX_MANIFEST_BYTES), path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return manifest


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The checked manifest of an artifact of ``kind`` ("emulator" or "adapter"; None: the kind
    the manifest names, for describing either)."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = _manifest_json(folder)
    if kind is None:
        kind = "adapter" if manifest.get("format") == "gradot-adapter" else "emulator"
    if manifest.get("format") != f"gradot-{kind}":
        raise ArtifactError(f"{path}: format is {_short(manifest.get('format'))}, expected 'gradot-{kind}'")
    if not _is_int(manifest.get("format_version")) or manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {_short(manifest.get('format_version'))} is not supported (expected {FORMAT_VERSION})"
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
#: Four times the deepest public LLM (126 layers): bounds what a manifest may make the loaders
#: enumerate, and, with an emulator never deeper than its base, the compute per token it may ask for.
MAX_LAYERS = 512
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
    # No method makes an emulator deeper than its base: more positions (one shared layer repeated
    # thousands of times) would only make fine-tuning and evaluation crawl.
    if not isinstance(slots, list) or not 2 * split.k + 1 <= len(slots) <= split.num_layers:
        raise bad("slots", slots, f"a list of {2 * split.k + 1} to {split.num_layers} positions (the base's depth)")
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
    """The listed file ``name``, refused if missing, not a plain file, over its size cap, or not the
    content the manifest's hash names."""
    path = folder / name
    limit = None if name.endswith(".safetensors") else MAX_SMALL_FILE_BYTES  # tensors: streamed, never held
    fd = _open_plain(path)
    try:
        size = os.fstat(fd).st_size
        if limit is not None and size > limit:
            raise ArtifactError(f"{path}: {size:,} bytes, more than the {limit:,} such a file may have")
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    if not isinstance(entry, dict) or entry.get("sha256") != h.hexdigest():
        raise ArtifactError(f"{path}: content hash does not match the manifest (modified or truncated)")
    return path


def check_listed_files(folder: Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Every file the manifest lists exists as a plain file with the listed hash (``skip``: files
    the caller hashes itself when it reads them)."""
    for name, entry in manifest["files"].items():
        if name not in skip:
            _check_hash(folder, name, entry)


# safetensors' dtype codes, named as torch names them (and as manifests write them).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}


def _check_header(path: Path, f, listed: dict, dtype: torch.dtype | None) -> None:
    """The file's tensor names, dtypes and shapes against the manifest, from its header alone: no
    tensor data is read before everything is known to be as listed."""
    keys = set(f.keys())
    extra, missing = sorted(keys - set(listed)), sorted(set(listed) - keys)
    if extra:
        raise ArtifactError(f"{path}: tensors not listed in the manifest: {', '.join(extra[:5])}")
    if missing:
        raise ArtifactError(f"{path}: tensors listed in the manifest but absent: {', '.join(missing[:5])}")
    for k in sorted(keys):
        view = f.get_slice(k)
        name, shape, spec = _SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype()), list(view.get_shape()), listed[k]
        if not isinstance(spec, dict) or spec.get("dtype") != name or spec.get("shape") != shape:
            raise ArtifactError(f"{path}: tensor {k} is {name}{shape}, manifest says {_short(spec)}")
        if name not in _DTYPES or (dtype is not None and name != _dtype_name(dtype)):
            wanted = _dtype_name(dtype) if dtype is not None else " or ".join(_DTYPES)
            raise ArtifactError(f"{path}: tensor {k} is {name}, expected {wanted}")


def read_tensors(folder: Path, name: str, entry: dict, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load one safetensors file, refusing anything the manifest does not describe exactly.

    Only floating tensors of the artifact dtypes are accepted (``dtype``: exactly that one)."""
    path = _check_hash(folder, name, entry)
    listed = entry.get("tensors")
    if not isinstance(listed, dict):
        raise ArtifactError(f"{folder / MANIFEST}: no tensor list for {name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_header(path, f, listed, dtype)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_why(exc)})") from exc
    for k, t in tensors.items():
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
    skeleton = _build_architecture(folder, config, dtype, arch, slots, lambda: torch.device("meta"))
    shapes = {k: list(v.shape) for k, v in skeleton.state_dict().items()}
    # Which tensors are one and the same follows from the architecture (tied embeddings, the slots'
    # layer sharing): the manifest must say exactly that, or a frozen weight could be tied to a
    # trainable one, or a shared layer shipped as two.
    _check_tensor_list(folder, manifest, shapes, _unique_state(skeleton)[1])
    return manifest, config, arch, slots, dtype


def load_emulator(folder: str | os.PathLike, device: str = "cpu") -> Emulator:
    """Rebuild an emulator from its directory alone (no access to the original model)."""
    from accelerate import init_empty_weights

    folder = Path(folder)
    # Everything is checked before a byte of tensor data is read: a listed, hash-correct extra
    # tensor of any size is refused without being loaded.
    manifest, config, arch, slots, dtype = _checked_emulator(folder)
    tensors = read_tensors(folder, EMULATOR_FILE, manifest["files"][EMULATOR_FILE], dtype=dtype)
    model = _build_architecture(folder, config, dtype, arch, slots, init_empty_weights)
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


#: Bounds on a shipped tokenizer (public tokenizers add at most a few thousand tokens, and replace or
#: prepend a character or two).
MAX_ADDED_TOKENS = 20_000
MAX_REPLACEMENT_CHARS = 64
#: The probe: ordinary text, and long runs of each kind of character (a backtracking split regex
#: fails on long words; an expanding normalizer shows in the token count).
PROBE_TEXTS = ["The offsite-tuning protocol, in 2024: 3.5 % of users' data!"] + [
    c * 20_000 + end for c in ("a", "Z", "0", " ", "\n", ".", "-", "'", "\u00e9", "\u4e2d", "\U0001f642")
    for end in ("", "b!")
] + ["ab1. " * 4_000, "a'b-c " * 3_000]
PROBE_SECONDS, PROBE_MEMORY = 120, 2 << 30
MAX_TOKENS_PER_CHAR = 8  # byte-level BPE: at most 4 per code point

_PROBE = """
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
ratio, top = 0.0, max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
for text in json.load(sys.stdin):
    ids = tok.encode(text, add_special_tokens=False).ids
    ratio, top = max(ratio, len(ids) / len(text)), max([top] + ids)
print(json.dumps({"ratio": ratio, "max_id": top}))
"""


def _limit_memory() -> None:  # runs in the probe's child process, before it executes
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (PROBE_MEMORY, PROBE_MEMORY))


def _check_tokenizer_json(path: Path, shown: Path) -> None:
    """Structural bounds on tokenizer.json: added tokens, and literal replacements' lengths."""
    data = _parse_json(_read_bounded(path, MAX_SMALL_FILE_BYTES), shown)
    if not isinstance(data, dict):
        raise ArtifactError(f"{shown}: expected a JSON object")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or len(added) > MAX_ADDED_TOKENS:
        count = f"{len(added):,}" if isinstance(added, list) else _short(added)
        raise ArtifactError(f"{shown}: {count} added tokens, "
                            f"more than the {MAX_ADDED_TOKENS:,} a tokenizer may add")
    stack = [data.get(part) for part in ("normalizer", "pre_tokenizer", "decoder")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key in ("content", "prepend"):
                if isinstance(node.get(key), str) and len(node[key]) > MAX_REPLACEMENT_CHARS:
                    raise ArtifactError(f"{shown}: a {_short(node.get('type'))} rule inserts {len(node[key]):,} "
                                        f"characters (at most {MAX_REPLACEMENT_CHARS})")
            stack.extend(node.values())


def _probe_tokenizer(path: Path, shown: Path, vocab_size: int) -> None:
    """Run the shipped tokenizer on the probe texts in a child process, bounded in time and memory:
    a Rust panic, a hang or a blow-up there is a refusal here, and no token id may fall outside the
    model's vocabulary."""
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(path)], input=json.dumps(PROBE_TEXTS),
                              capture_output=True, text=True, timeout=PROBE_SECONDS, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{shown}: the shipped tokenizer took over {PROBE_SECONDS} s on long words") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no message"]
        why = next((line for line in reversed(lines) if "Exception:" in line or "Error:" in line), lines[-1])
        raise ArtifactError(f"{shown}: the shipped tokenizer fails on long words or ordinary text ({_why(why)})")
    result = json.loads(done.stdout)
    if result["ratio"] > MAX_TOKENS_PER_CHAR:
        raise ArtifactError(f"{shown}: the shipped tokenizer makes {result['ratio']:.0f} tokens of one character "
                            f"(at most {MAX_TOKENS_PER_CHAR})")
    if result["max_id"] >= vocab_size:
        raise ArtifactError(f"{shown}: the shipped tokenizer has token id {result['max_id']}, the model has "
                            f"{vocab_size} embeddings")


def load_emulator_tokenizer(folder: str | os.PathLike):
    """The tokenizer shipped in an emulator directory (its files are hash-checked first, its
    bounds checked, and it is probed in a child process before it is loaded here)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder, "emulator")
    for needed in ("tokenizer_config.json", "tokenizer.json"):
        if needed not in manifest["files"]:
            raise ArtifactError(f"{folder}: the emulator ships no {needed} (saved without a fast tokenizer)")
    if CONFIG_FILE not in manifest["files"]:
        raise ArtifactError(f"{folder / MANIFEST}: must list {CONFIG_FILE}")
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
        config = read_config(Path(tmp), shown=folder)  # refuses custom code before the tokenizer loader reads it
        tok_config = Path(tmp) / "tokenizer_config.json"
        raw = _parse_json(_read_bounded(tok_config, MAX_SMALL_FILE_BYTES), folder / tok_config.name)
        if not isinstance(raw, dict):
            raise ArtifactError(f"{folder / tok_config.name}: expected a JSON object")
        if "auto_map" in raw:
            raise ArtifactError(f"{folder / tok_config.name}: asks for custom code (auto_map); gradot never runs it")
        if len(raw.get("added_tokens_decoder") or ()) > MAX_ADDED_TOKENS:
            raise ArtifactError(f"{folder / tok_config.name}: more than the {MAX_ADDED_TOKENS:,} added tokens a "
                                f"tokenizer may have")
        _check_tokenizer_json(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")
        _probe_tokenizer(Path(tmp) / "tokenizer.json", folder / "tokenizer.json", config.vocab_size)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
            tok("The offsite-tuning protocol.")  # a field of the wrong type may only fail on first use
        except Exception as exc:  # noqa: BLE001
            # The one place the sender's tokenizer files meet third-party parsers, and the tokenizers
            # library reports a malformed tokenizer.json as a bare Exception (TypeError, KeyError,
            # AttributeError come from transformers on wrongly typed fields).
            raise ArtifactError(f"{folder}: cannot load the shipped tokenizer ({_why(exc)})") from exc
    top = max(tok.get_vocab().values(), default=-1)  # added tokens included
    if top >= config.vocab_size:
        raise ArtifactError(f"{folder / 'tokenizer.json'}: the shipped tokenizer has token id {top}, the model has "
                            f"{config.vocab_size} embeddings")
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


#: Relative change ||new - original|| / ||original|| of an adapter tensor beyond which fine-tuning is
#: not a plausible cause (fine-tuning at the default learning rates moves adapter tensors by a few
#: per cent): such an adapter is plugged with a warning, or refused under ``max_change``.
PLAUSIBLE_CHANGE = 1.0


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
    """Warn about (or, beyond ``max_change``, refuse) weights moved further than fine-tuning moves them."""
    def change(name: str) -> float:
        old = own[name].detach().to("cpu", torch.float64)
        return float((tensors[name].to(torch.float64) - old).norm() / old.norm().clamp_min(1e-12))

    worst, ratio = max(((name, change(name)) for name in tensors), key=lambda item: item[1])
    if max_change is not None and ratio > max_change:
        raise ArtifactError(f"{folder / ADAPTER_FILE}: {worst} moved {ratio:.3g}x its original norm, more than "
                            f"the allowed {max_change:g}x")
    if ratio > PLAUSIBLE_CHANGE:
        logger.warning("%s", printable(f"warning: {folder / ADAPTER_FILE}: {worst} moved {ratio:.3g}x its original "
                                       f"norm; no plausible fine-tuning does that (check the adapter's origin)"))


def _copy_into(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():  # every check passed: only now is the model written
        for name, t in tensors.items():
            own[name].copy_(t)


def plug_in(model: nn.Module, adapter_dir: str | os.PathLike, k: int = 2, max_change: float | None = None) -> nn.Module:
    """Copy a fine-tuned adapter into the original ``model`` (in place) after checking it fits.

    ``k`` is the split the model owner compressed with (``compress --adapter-layers``; default 2, or
    ``emulator_split(emulator_dir)``): only its 2k layers are ever replaced, whatever the adapter
    claims. Refused, with the reason: an adapter for another base model (fingerprint), another split
    or layer set, other tensor names or shapes, missing or modified listed files, values that
    overflow the model's dtype, or (``max_change``) weights moved too far from the originals.
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
    _copy_into(own, tensors)
    return model


def plug_into_emulator(emulator: Emulator, adapter_dir: str | os.PathLike, max_change: float | None = None) -> None:
    """Load an adapter into the emulator it was trained on, with exactly ``plug_in``'s checks (the
    split and fingerprint are the emulator's)."""
    m = emulator.manifest
    split = Split(m["base"]["num_layers"], m["adapter"]["k"])
    own = adapter_state_dict(emulator.model, emulator.adapter_sources, emulator.adapter_positions)
    tensors = _checked_adapter(Path(adapter_dir), model_type=m["model_type"], split=split,
                               owner="the emulator's split", own=own, max_change=max_change,
                               fingerprint_of=lambda dtype: m["base"]["fingerprint"])
    _copy_into(own, tensors)


def emulator_split(emulator_dir: str | os.PathLike) -> int:
    """The adapter size k the model owner chose, as recorded in its emulator's manifest."""
    return read_manifest(emulator_dir, "emulator")["adapter"]["k"]


def _training_lines(training: Any, indent: str = "  ") -> list[str]:
    """The adapter's ``training`` entry as one ``key: value`` line per item (nested dicts indented)."""
    if not isinstance(training, dict) or not training:
        return ["training: (not recorded)"]
    lines = ["training:"]

    def walk(entry: dict, depth: int) -> None:
        for key, value in entry.items():
            if isinstance(value, dict):
                lines.append(f"{indent * depth}{key}:")
                walk(value, depth + 1)
            else:
                shown = f"{value:.4g}" if isinstance(value, float) else value
                if isinstance(value, list):
                    shown = ", ".join(str(v) for v in value) or "(none)"
                lines.append(f"{indent * depth}{key}: {shown}")

    walk(training, 1)
    return lines


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
        emu = manifest.get("emulator") if isinstance(manifest.get("emulator"), dict) else {}
        lines.append(f"trained on: a {emu.get('method')} emulator, keep achieved {emu.get('keep_achieved')}")
        lines += _training_lines(manifest.get("training"))
    for name, entry in manifest.get("files", {}).items():
        n = len(entry.get("tensors", {})) if isinstance(entry, dict) else 0
        lines.append(f"file {name}: sha256 {str(entry.get('sha256', ''))[:16]}…" + (f"  {n} tensors" if n else ""))
    # Every string here came from the sender: no terminal control sequences reach the screen.
    return "\n".join(printable(line) for line in lines)
