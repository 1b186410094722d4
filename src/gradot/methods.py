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


#: Methods that read calibration text.
CALIBRATED = ("crash", "gradot", "wanda")


def check_calibration(args) -> None:
    """Fail on a missing or unreadable calibration file before any model is loaded."""
    if args.method in CALIBRATED:
        from .calib import read_corpus

        read_corpus(args.calib or default_calibration_path())


def _uniform(model, tok, args) -> Emulator:
    return uniform_emulator(model, split_model(model, args.adapter_layers), args.keep)


def _crash(model, tok, args) -> Emulator:
    batches, spec = _calibration(tok, args)
    emulator = crash_emulator(model, split_model(model, args.adapter_layers), args.keep, batches)
    emulator.manifest["calibration"] = spec.describe()
    return emulator


def _gradot_like(selection: str):
    def run(model, tok, args) -> Emulator:
        from .gradot_method import GradOTConfig, collect_and_score, gradot_emulator, middle_linears, needs_gradients
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
        factors, scores, settings = None, None, {}
        auto = selection == "gcs" and getattr(args, "auto_lambda", None) is not None
        layers_per_pass = getattr(args, "layers_per_pass", None)
        if selection != "svd":
            batches, spec = _calibration(tok, args)
            if layers_per_pass and auto:
                from .cli import UsageError

                raise UsageError("--auto-lambda needs every layer's statistics at once; drop --layers-per-pass")
            if layers_per_pass:  # large models: a few layers' factors in memory at a time
                scores = collect_and_score(model, split, cfg, batches, layers_per_pass=layers_per_pass,
                                           gradient_checkpointing=args.gradient_checkpointing)
            else:
                factors = collect_kfac(model, middle_linears(model, split, mlp_only=selection == "wanda"), batches,
                                       gradient_checkpointing=args.gradient_checkpointing,
                                       gradients=auto or needs_gradients(cfg))
            settings["calibration"] = spec.describe()
        if selection == "gcs" and args.auto_lambda is not None:
            from dataclasses import replace

            from .auto_lambda import auto_lambda
            from .gradot_method import rescore, score_middle

            # Held-out calibration batches (the last ones) judge the gradient proxy.
            held_out = batches[-max(1, len(batches) // 4):]
            base = score_middle(model, split, factors, cfg)  # scored once for the sweep and the result
            lam, curve = auto_lambda(model, split, factors, cfg, held_out, threshold=args.auto_lambda, scores=base)
            cfg = replace(cfg, lambda_attn=lam, lambda_mlp=lam)
            scores = rescore(base, cfg)
            settings["auto_lambda"] = {"threshold": args.auto_lambda, "chosen": lam, "curve": curve}
        from .progress import stage

        # Scoring every component and channel, then building the layers: minutes on a CPU, no bar.
        with stage(f"{_NAMES[selection]}: scoring and building the emulator"):
            emulator = gradot_emulator(model, split, cfg, factors, method=_NAMES[selection], settings=settings,
                                       scores=scores)
        if "calibration" in settings:
            emulator.manifest["calibration"] = settings["calibration"]
        return emulator

    return run


_NAMES = {"gcs": "gradot", "svd": "svd", "wanda": "wanda"}

#: Default share of the middle block an emulator keeps: chosen on the measured transfer frontier
#: (docs/transfer.md): at 0.4 no method carried the fine-tuning gain into the full model.
DEFAULT_KEEP = 0.7

METHODS: dict[str, Callable] = {
    "uniform": _uniform,
    "crash": _crash,
    "gradot": _gradot_like("gcs"),
    "svd": _gradot_like("svd"),
    "wanda": _gradot_like("wanda"),
}


def _gradot_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _positive_int
    from .gradot_method import ALLOCATIONS

    g = p.add_argument_group("gradot / svd / wanda")
    g.add_argument("--lambda-attn", type=float, default=0.0,
                   help="weight of the first-order (privacy) term for attention DRD; 0 = curvature only")
    g.add_argument("--lambda-mlp", type=float, default=0.0,
                   help="weight of the first-order (privacy) term for MLP SCP; 0 = curvature only")
    g.add_argument("--allocation", default="global", choices=ALLOCATIONS,
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
    g.add_argument("--layers-per-pass", type=_positive_int, default=None, metavar="N",
                   help="large models: collect and score the KFAC statistics of N middle layers per "
                        "forward-backward pass, freeing each chunk's factors before the next (same emulator; "
                        "one pass over the calibration set per chunk)")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """Options of individual methods (registered by the methods that need them)."""
    for hook in ARGUMENT_HOOKS:
        hook(p)


ARGUMENT_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = [_gradot_arguments]


def compress(model, tok, args) -> Emulator:
    return METHODS[args.method](model, tok, args)
