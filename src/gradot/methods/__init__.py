"""Compression methods, one module each, behind one ``REGISTRY``.

A method (``base.Method``) is a name, a config dataclass whose fields carry their help text, whether
it reads calibration text, and ``build(model, split, config, calibration) -> Emulator``. Registering
one (``register``) is all it takes for ``gradot compress --method``, ``gradot pipeline``, the
manifest and the benchmarks to offer it: they read ``REGISTRY`` and the config's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import Field
from typing import Any

from ..errors import MethodConfigError
from . import crash, distill, scaleot, uniform
from .gradot import svd, wanda
from .base import (
    DEFAULT_KEEP,
    Calibration,
    Method,
    MethodConfig,
    SimpleMethod,
    config_options,
    make_config,
    option,
    same_option,
)
from .gradot import GRADOT

REGISTRY: dict[str, Method] = {}

#: Options every calibrated method reads (the command line's calibration group), and the split.
CALIBRATION_OPTIONS = ("calib", "calib_sequences", "calib_len", "batch_size")


def register(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (a later registration of the same name replaces it)."""
    if not isinstance(method, Method):
        raise TypeError(f"{method!r} lacks what a Method has (name, help, config, needs_calibration, build)")
    REGISTRY[method.name] = method
    return method


for _method in (uniform.METHOD, crash.METHOD, GRADOT, svd.METHOD, wanda.METHOD, distill.METHOD, scaleot.METHOD):
    register(_method)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise MethodConfigError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def method_options() -> dict[str, tuple[Field, list[str]]]:
    """Every registered method's options: name -> (its field, the methods that read it). Methods
    sharing an option must declare it alike (``base.same_option``)."""
    out: dict[str, tuple[Field, list[str]]] = {}
    for name in sorted(REGISTRY):
        for f in config_options(REGISTRY[name].config):
            if f.name in out:
                first = out[f.name][0]
                if (first.default, dict(first.metadata)) != (f.default, dict(f.metadata)):
                    raise TypeError(f"option {f.name!r} declared differently by {out[f.name][1]} and {name}")
                out[f.name][1].append(name)
            else:
                out[f.name] = (f, [name])
    return out


def compress_option_names() -> tuple[str, ...]:
    """The keys ``compress`` reads from its ``options``: the split, calibration and every method option."""
    return ("adapter_layers",) + CALIBRATION_OPTIONS + tuple(method_options())


def runtime_options() -> tuple[str, ...]:
    """Options that change how fast, not what, is computed (calibration batch size included)."""
    return ("batch_size",) + tuple(n for n, (f, _) in method_options().items() if f.metadata["runtime"])


def calibration_spec(options: Mapping[str, Any]):
    from ..stats.calib import CalibrationSpec, default_calibration_path

    return CalibrationSpec(path=str(options.get("calib") or default_calibration_path()),
                           num_sequences=options["calib_sequences"], seq_len=options["calib_len"],
                           batch_size=options["batch_size"])


def check_calibration(method: str, calib: str | None) -> None:
    """Fail on a missing or unreadable calibration file before any model is loaded."""
    if get(method).needs_calibration:
        from ..stats.calib import default_calibration_path, read_corpus

        read_corpus(calib or default_calibration_path())


def compress(model, tok, method: str, keep: float, options: Mapping[str, Any]):
    """``method``'s emulator of ``model``. ``options`` holds ``adapter_layers``, the calibration
    options (for methods that read calibration text) and the method's own options (others' are
    ignored, missing ones take their defaults)."""
    from ..split import split_model
    from ..stats.calib import calibration_batches

    m = get(method)
    config = make_config(m.config, keep, options)
    calibration = None
    if m.needs_calibration:
        spec = calibration_spec(options)
        calibration = Calibration(calibration_batches(tok, spec), spec.describe())
    emulator = m.build(model, split_model(model, options.get("adapter_layers", 2)), config, calibration)
    if calibration is not None:
        emulator.manifest["calibration"] = calibration.described
    return emulator


__all__ = ["CALIBRATION_OPTIONS", "DEFAULT_KEEP", "REGISTRY", "Calibration", "Method", "MethodConfig", "SimpleMethod",
           "check_calibration", "compress", "compress_option_names", "config_options", "get", "make_config",
           "method_options", "option", "register", "runtime_options", "same_option"]
