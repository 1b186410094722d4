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


def _gradot_like(selection: str):
    def run(model, tok, args) -> Emulator:
        from .gradot_method import GradOTConfig, gradot_emulator, middle_linears
        from .kfac import collect_kfac

        split = split_model(model, args.adapter_layers)
        cfg = GradOTConfig(
            keep=args.keep,
            lambda_attn=args.lambda_attn if selection == "gcs" else 0.0,
            lambda_mlp=args.lambda_mlp if selection == "gcs" else 0.0,
            allocation=args.allocation if selection == "gcs" else "uniform",
            selection=selection,
            top_frac=args.top_frac,
        )
        factors, settings = None, {}
        if selection != "svd":
            batches, spec = _calibration(tok, args)
            factors = collect_kfac(model, middle_linears(model, split, mlp_only=selection == "wanda"), batches,
                                   gradient_checkpointing=args.gradient_checkpointing)
            settings["calibration"] = spec.describe()
        if selection == "gcs" and args.auto_lambda is not None:
            from dataclasses import replace

            from .auto_lambda import auto_lambda

            # Held-out calibration batches (the last ones) judge the gradient proxy.
            held_out = batches[-max(1, len(batches) // 4):]
            lam, curve = auto_lambda(model, split, factors, cfg, held_out, threshold=args.auto_lambda)
            cfg = replace(cfg, lambda_attn=lam, lambda_mlp=lam)
            settings["auto_lambda"] = {"threshold": args.auto_lambda, "chosen": lam, "curve": curve}
        emulator = gradot_emulator(model, split, cfg, factors, method=_NAMES[selection], settings=settings)
        if "calibration" in settings:
            emulator.manifest["calibration"] = settings["calibration"]
        return emulator

    return run


_NAMES = {"gcs": "gradot", "svd": "svd", "wanda": "wanda"}

METHODS: dict[str, Callable] = {
    "uniform": _uniform,
    "crash": _crash,
    "gradot": _gradot_like("gcs"),
    "svd": _gradot_like("svd"),
    "wanda": _gradot_like("wanda"),
}


def _gradot_arguments(p: argparse.ArgumentParser) -> None:
    from .gradot_method import ALLOCATIONS

    g = p.add_argument_group("gradot / svd / wanda")
    g.add_argument("--lambda-attn", type=float, default=0.0,
                   help="weight of the first-order (privacy) term for attention DRD; 0 = curvature only")
    g.add_argument("--lambda-mlp", type=float, default=0.0,
                   help="weight of the first-order (privacy) term for MLP SCP; 0 = curvature only")
    g.add_argument("--allocation", default="uniform", choices=ALLOCATIONS,
                   help="uniform: same keep ratio in every matrix; global: lowest curvature cost per parameter "
                        "across all components and channels; global-layers: also whole layers")
    g.add_argument("--auto-lambda", type=float, default=None, metavar="THRESHOLD",
                   help="choose λ automatically: the largest λ (grid 0.001..1) whose adapter-gradient cosine on "
                        "held-out calibration text stays >= THRESHOLD x the cosine at λ=0 (e.g. 0.95); "
                        "overrides --lambda-attn/--lambda-mlp")
    g.add_argument("--top-frac", type=float, default=0.05,
                   help="share of singular components kept unconditionally by singular value")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations during the statistics pass (large models)")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """Options of individual methods (registered by the methods that need them)."""
    for hook in ARGUMENT_HOOKS:
        hook(p)


ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = [_gradot_arguments]


def compress(model, tok, args) -> Emulator:
    return METHODS[args.method](model, tok, args)
