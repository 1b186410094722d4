"""The manifest: file names, reading ``manifest.json`` (size-capped), checking every field the
loaders, ``describe`` or ``save_adapter`` use, and describing a manifest to a person."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..emulator import FORMAT_VERSION, Slot
from ..errors import ArtifactError, printable
from ..split import Split
from .files import MANIFEST, MAX_LAYERS, MAX_MANIFEST_BYTES, _DTYPES, _parse_json, _read_bounded, _short, _why


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


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON integers; bools and floats are not


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


_HEX64 = frozenset("0123456789abcdef")


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
    known = {"source", "role", "shares", "ranks", "channels", "replaces"}
    replaced: set[int] = set()
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
        span = s.get("replaces")
        if span is not None:
            # A harmonizer: a trained stand-in for consecutive middle layers, starting at its source,
            # each layer replaced once.
            if (role != "middle" or shares is not None or not isinstance(span, list) or not span
                    or not all(_is_int(i) for i in span) or span != list(range(source, source + len(span)))
                    or not set(span) <= middle_sources or set(span) & replaced):
                raise bad(f"{where}.replaces", span, "null, or on a middle position with its own weights the "
                          "consecutive middle layers from its source, none replaced twice")
            replaced |= set(span)


def _slots(manifest: dict, where: Path) -> list[Slot]:
    try:
        slots = [Slot(**s) for s in manifest["slots"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{where}: malformed 'slots' ({_why(exc)})") from exc
    for pos, s in enumerate(slots):
        if s.shares is not None and not (isinstance(s.shares, int) and 0 <= s.shares < pos and slots[s.shares].shares is None):
            raise ArtifactError(f"{where}: slot {pos} shares an invalid position {s.shares!r}")
    return slots


def emulator_split(emulator_dir: str | os.PathLike) -> int:
    """The adapter size k the model owner chose, as recorded in its emulator's manifest."""
    return read_manifest(emulator_dir, "emulator")["adapter"]["k"]


#: What ``describe`` shows of the sender's values: characters per line, entries per mapping (``gradot
#: info --json`` prints the manifest whole).
MAX_SHOWN_CHARS, MAX_SHOWN_ITEMS = 240, 40


def _clip(line: str) -> str:
    """``line`` (escaped) cut to MAX_SHOWN_CHARS, saying how many characters were cut."""
    line = printable(line)
    if len(line) <= MAX_SHOWN_CHARS:
        return line
    return f"{line[:MAX_SHOWN_CHARS]}… ({len(line) - MAX_SHOWN_CHARS:,} more characters)"


def _items(entry: dict, indent: str) -> tuple[list, list[str]]:
    """The first MAX_SHOWN_ITEMS items of ``entry``, and a line saying how many more there are."""
    items = list(entry.items())
    more = [f"{indent}… ({len(items) - MAX_SHOWN_ITEMS:,} more entries)"] if len(items) > MAX_SHOWN_ITEMS else []
    return items[:MAX_SHOWN_ITEMS], more


def _training_lines(training: Any, indent: str = "  ") -> list[str]:
    """The adapter's ``training`` entry as one ``key: value`` line per item (nested dicts indented)."""
    if not isinstance(training, dict) or not training:
        return ["training: (not recorded)"]
    lines = ["training:"]

    def walk(entry: dict, depth: int) -> None:
        items, more = _items(entry, indent * depth)
        for key, value in items:
            if isinstance(value, dict):
                lines.append(f"{indent * depth}{key}:")
                walk(value, depth + 1)
            else:
                shown = f"{value:.4g}" if isinstance(value, float) else value
                if isinstance(value, list):
                    shown = ", ".join(str(v) for v in value[:MAX_SHOWN_CHARS]) or "(none)"
                lines.append(f"{indent * depth}{key}: {shown}")
        lines.extend(more)

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
        settings, more = _items(manifest.get("settings", {}), "  ")
        lines += [f"  {key}: {value}" for key, value in settings] + more
        lines.append("slots (position: source layer, role, shapes):")
        for pos, s in enumerate(manifest.get("slots", [])):
            detail = []
            if s.get("shares") is not None:
                detail.append(f"shares weights of position {s['shares']}")
            if s.get("replaces"):
                detail.append("harmonizer for layers " + ", ".join(str(i) for i in s["replaces"]))
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
    # Every string here came from the sender: no terminal control sequences reach the screen, and
    # no value fills it (a line is cut, saying how much; --json prints the manifest whole).
    return "\n".join(_clip(line) for line in lines)
