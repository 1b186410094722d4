"""A folder of cached experiment cells, shared by ``gradot pipeline`` and ``bench/transfer.py``.

A cell is one finished piece of an experiment (an evaluation, a fine-tuned adapter's scores) stored as
one JSON file, written atomically so that a killed run never leaves half a cell. A rerun reads the
cells there are and computes only the missing ones (resume); a report-only run computes nothing. The
folder's settings record (``settings.json`` beside ``cells/``) names what every cell depends on, so a
run with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CellSettingsError

log = logging.getLogger(__name__)

#: The folder's record of the settings its cells were computed with.
SETTINGS_FILE = "settings.json"


def write_json_atomic(path: Path, value: Any) -> None:
    """``value`` as indented JSON at ``path``, through a temporary file: a kill never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


class CellStore:
    """The cells of one folder: ``cell(key, compute)`` returns the cached value of ``key`` or computes,
    times (``seconds``), stamps (``stamp()``'s entries, e.g. the git commit) and stores it."""

    def __init__(self, folder: str | Path, report_only: bool = False,
                 stamp: Callable[[], dict[str, Any]] | None = None):
        self.folder = Path(folder)
        self.report_only = report_only
        self.stamp = stamp
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def cell(self, key: str, compute: Callable[[], dict[str, Any]],
             on_stage: Callable[[bool], None] | None = None) -> dict[str, Any] | None:
        """The cell ``key``: read when cached, else ``compute()``d and stored; ``None`` when report-only
        and not cached. ``on_stage(cached)`` is called before reading or computing (progress lines)."""
        path = self.path(key)
        if path.exists():
            if on_stage:
                on_stage(True)
            return json.loads(path.read_text())
        if self.report_only:
            return None
        if on_stage:
            on_stage(False)
        t0 = time.perf_counter()
        value = compute()
        value["seconds"] = round(time.perf_counter() - t0, 1)
        if self.stamp:
            value.update(self.stamp())
        write_json_atomic(path, value)
        return value

    def stored(self, pattern: str = "*.json") -> Iterator[tuple[Path, dict[str, Any]]]:
        """``(path, value)`` of every stored cell matching ``pattern``, in name order."""
        for path in sorted(self.folder.glob(pattern)):
            yield path, json.loads(path.read_text())


def difference(key: str, before: Any, now: Any) -> str:
    """``key: before -> now``, descending into nested dicts to name only the entries that changed;
    a table of plain values whose every entry changed alike (one rate for every task) is said once."""
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return f"{key}: {before!r} -> {now!r}"
    keys = sorted(set(before) | set(now))
    changed = [k for k in keys if before.get(k) != now.get(k)]
    plain = not any(isinstance(v, dict) for v in (*before.values(), *now.values()))
    pairs = {(repr(before.get(k)), repr(now.get(k))) for k in changed}
    if plain and len(keys) > 1 and len(changed) == len(keys) and len(pairs) == 1:
        (x, y), = pairs
        return f"{key}: {x} -> {y} (every task)" if key.startswith("learning_rates") else f"{key}: {x} -> {y} (every entry)"
    return "; ".join(difference(f"{key}.{k}", before.get(k), now.get(k)) for k in changed)


def claim_folder(out: Path, settings: dict[str, Any], record: bool = True,
                 upgrade: Callable[[dict, dict], dict] | None = None,
                 error: type[CellSettingsError] = CellSettingsError,
                 hint: str = "use another --out, or remove the folder to start over") -> None:
    """Refuse a folder whose cells were computed with other settings; record ours otherwise.

    ``upgrade(old, settings)`` brings an older record to today's form first (keys added since get the
    values its cells were computed with). A folder with cells but no record (made before records
    existed) is adopted as it is.
    """
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as exc:
            raise error(f"{path}: unreadable ({exc})") from None
        if upgrade:
            old = upgrade(old, settings)
        changed = [difference(k, old.get(k), v) for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise error(f"{out} holds cells computed with other settings ({'; '.join(changed)}): {hint}")
    elif record:
        if any((out / "cells").glob("*.json")):
            log.warning("%s: cells without a settings record; recording the current settings for them", out)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1))
