"""Compression methods by name: what ``gradot compress --method`` dispatches to."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .baselines import crash_emulator, uniform_emulator
from .calib import CalibrationSpec, calibration_batches, default_calibration_path
from .emulator import Emulator
from .split import split_model


def _calibration(tok, args) -> tuple[list, CalibrationSpec]:
    spec = CalibrationSpec(
        path=str(args.calib or default_calibration_path()),
        num_sequences=args.calib_sequences,
        seq_len=args.calib_len,
        batch_size=args.batch_size,
    )
    return calibration_batches(tok, spec), spec


def _uniform(model, tok, args) -> Emulator:
    return uniform_emulator(model, split_model(model, args.adapter_layers), args.keep)


def _crash(model, tok, args) -> Emulator:
    batches, spec = _calibration(tok, args)
    emulator = crash_emulator(model, split_model(model, args.adapter_layers), args.keep, batches)
    emulator.manifest["calibration"] = spec.describe()
    return emulator


METHODS: dict[str, Callable] = {"uniform": _uniform, "crash": _crash}


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """Options of individual methods (registered by the methods that need them)."""
    for hook in ARGUMENT_HOOKS:
        hook(p)


ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []


def compress(model, tok, args) -> Emulator:
    return METHODS[args.method](model, tok, args)
