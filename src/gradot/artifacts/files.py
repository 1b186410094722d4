"""Safe file handling for artifacts: bounded reads that never follow links or open devices, outputs
written to a temporary folder and swapped in atomically (one writer per output), content hashes, and
safetensors files checked against their manifest entry before any tensor is read."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ArtifactError


MANIFEST = "manifest.json"


EMULATOR_FILE = "emulator.safetensors"


ADAPTER_FILE = "adapter.safetensors"


CONFIG_FILE = "config.json"


logger = logging.getLogger(__name__)


def _why(exc: BaseException, limit: int = 300) -> str:
    """A library exception as a short one-line reason."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _short(x: Any, limit: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: Four times the deepest public LLM (126 layers): bounds what a manifest may make the loaders
#: enumerate, and, with an emulator never deeper than its base, the compute per token it may ask for.
MAX_LAYERS = 512


_DTYPES = ("float32", "float16", "bfloat16", "float64")


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
