"""What every benchmark repeats: the commit and machine it ran on, peak memory, and building an
emulator by method name through the library's registry (``gradot.methods.REGISTRY``).

Benchmarks import it as ``common`` (a script's folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path

from gradot.provenance import git_commit  # noqa: F401  (every benchmark records it)


def machine(device=None, threads: int | None = None) -> str:
    """The GPU (when ``device`` is a CUDA device, or with no device given, when one is visible), else
    the CPU: cores, torch threads, load average; and torch's version."""
    import torch

    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if cuda:
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    try:
        load = ", load average %.1f" % os.getloadavg()[0]
    except (OSError, AttributeError):
        load = ""
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads or torch.get_num_threads()} torch threads"
            f"{load}, torch {torch.__version__}")


class PeakRSS:
    """Peak resident set size of this process, sampled in a thread every ``interval`` seconds: a
    context manager (``with PeakRSS() as rss``) or ``start()``/``stop()``; ``start`` and ``peak``
    are bytes."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.start_rss = 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> PeakRSS:
        self.start_rss = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def table_row(cells) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_markdown(path: Path, lines: list[str]) -> None:
    """The report's Markdown lines written to ``path`` and printed."""
    path.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def method_variant(label: str) -> tuple[str, dict]:
    """A benchmark's method label as a registered method and its options: ``gradot-global-layers``
    is ``gradot`` with ``allocation`` global-layers; a registered name is itself."""
    from gradot.methods import REGISTRY, config_options

    if label in REGISTRY:
        return label, {}
    name, _, allocation = label.partition("-")
    if name in REGISTRY and any(f.name == "allocation" for f in config_options(REGISTRY[name].config)):
        return name, {"allocation": allocation}
    raise SystemExit(f"unknown method {label!r}; registered: {', '.join(sorted(REGISTRY))} "
                     "(and <method>-<allocation> for methods with an allocation)")


def build_emulator(label: str, model, split, keep: float, *, batches=None, factors=None, options=None,
                   method_name: str | None = None):
    """The emulator of method ``label`` (``method_variant``) through the registry.

    Methods scored from KFAC factors (GradOT and its ablations: their configs have ``engine``) use
    ``factors`` when given (a dict, or a callable returning one, called only if needed), so a
    benchmark collects them once for many emulators; other methods read ``batches`` as their
    calibration text. ``options`` override the method's defaults; ``method_name`` is the
    manifest's method for the factor path (default: the registered name).
    """
    from gradot.methods import Calibration, get, make_config

    name, variant = method_variant(label)
    method = get(name)
    config = make_config(method.config, keep, {**variant, **(options or {})})
    if factors is not None and hasattr(config, "engine"):
        from gradot.methods.gradot import gradot_emulator

        cfg = config.engine()
        if cfg.selection == "svd":
            factors = None  # the svd ablation reads no statistics
        elif callable(factors):
            factors = factors()
        return gradot_emulator(model, split, cfg, factors, method=method_name or name)
    calibration = Calibration(list(batches), {}) if method.needs_calibration else None
    return method.build(model, split, config, calibration)


def gpu_sync(device: str = "cuda") -> None:
    """Wait for queued GPU work on ``device`` (nothing on the CPU), so that a clock reads what the work took."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)
