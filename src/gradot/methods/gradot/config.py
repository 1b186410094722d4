"""GradOT's settings: ``GradOTConfig`` for the scoring, allocation and surgery functions, and
``GradOTOptions``, what a user chooses (the ``gradot`` method's config: the command line's options)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...errors import MethodConfigError
from ..base import MethodConfig, option, same_option

ALLOCATIONS = ("uniform", "global", "global-layers")
SELECTIONS = ("gcs", "svd", "wanda")


@dataclass(frozen=True)
class GradOTConfig:
    keep: float
    lambda_attn: float = 0.0
    lambda_mlp: float = 0.0
    allocation: str = "uniform"  # uniform | global | global-layers
    selection: str = "gcs"  # gcs (GradOT) | svd (singular values + weight norm) | wanda (svd + activation-aware)
    top_frac: float = 0.05  # share of components kept by singular value unconditionally
    layer_drop: float = 0.0  # share of middle layers dropped whole (evenly spaced) before the allocation
    damping: float = 0.0  # KFAC factors scored as A + δ·mean(diag A)·I, G + δ·mean(diag G)·I

    def __post_init__(self):
        if not 0.0 <= self.layer_drop < 1.0:
            raise ValueError(f"layer_drop must be in [0, 1), got {self.layer_drop}")
        if not (self.damping >= 0.0 and math.isfinite(self.damping)):
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection != "gcs" and self.allocation != "uniform":
            raise ValueError("the svd/wanda ablations have no curvature cost: use allocation 'uniform'")


@dataclass(frozen=True)
class GradOTOptions(MethodConfig):
    """The ``gradot`` method's settings."""

    lambda_attn: float = option(0.0, "weight of the first-order (privacy) term for attention DRD; 0 = curvature only")
    lambda_mlp: float = option(0.0, "weight of the first-order (privacy) term for MLP SCP; 0 = curvature only")
    allocation: str = option("global", "uniform: same keep ratio in every matrix; global: lowest curvature cost per "
                             "parameter across all components and channels; global-layers: also whole layers",
                             choices=ALLOCATIONS)
    auto_lambda: float | None = option(
        None, "choose λ automatically: the largest λ (grid 0.001..1) whose adapter-gradient cosine on held-out "
        "calibration text stays >= THRESHOLD x the cosine at λ=0 (e.g. 0.95); overrides --lambda-attn/--lambda-mlp",
        kind=float, metavar="THRESHOLD")
    top_frac: float = option(0.05, "share of singular components kept unconditionally by singular value")
    layer_drop: float = option(
        0.0, "hybrid with OT†: drop this share of the middle layers whole, evenly spaced as OT† chooses them "
        "(the first and last middle layers stay), then allocate the budget by curvature inside the rest")
    damping: float = option(
        0.0, "Tikhonov damping of the KFAC factors before scoring: A + δ·mean(diag A)·I and G + δ·mean(diag G)·I "
        "(0 = none; a large δ moves the curvature cost toward plain weight magnitude; docs/transfer.md measures it)")
    kfac_tokens: float = option(
        1.0, "share of each calibration batch's tokens whose x xᵀ and g gᵀ products enter the KFAC factors (a "
        "seeded random sample; 1 = every token, exact); the pass is unchanged, the products cost about this share "
        "of their time (docs/speed.md: 0.5 moves the plan less than another calibration sample does)")
    kfac_bf16: bool = option(False, "compute the KFAC products from bfloat16 copies, summed in float32 (about half "
                             "their time on CPUs with bfloat16 units and on GPUs; the plan is unchanged to 1e-4)")
    gradient_checkpointing: bool = option(False, "recompute activations during the statistics pass (large models)",
                                          runtime=True)
    layers_per_pass: int | None = option(
        None, "large models: collect and score the KFAC statistics of N middle layers per forward-backward pass, "
        "freeing each chunk's factors before the next (same emulator; one pass over the calibration set per chunk)",
        kind=int, minimum=1, metavar="N", runtime=True)

    def __post_init__(self):
        if not 0.0 <= self.layer_drop < 1.0:
            raise MethodConfigError(f"--layer-drop must be in [0, 1), got {self.layer_drop}")
        if not (self.damping >= 0.0 and math.isfinite(self.damping)):
            raise MethodConfigError(f"--damping must be a finite number >= 0, got {self.damping}")
        if not 0.0 < self.kfac_tokens <= 1.0:
            raise MethodConfigError(f"--kfac-tokens must be in (0, 1], got {self.kfac_tokens}")
        if self.layer_drop and self.allocation == "global-layers":
            raise MethodConfigError("--layer-drop fixes which layers go: use --allocation global or uniform with it")
        if self.auto_lambda is not None and self.layers_per_pass:
            raise MethodConfigError("--auto-lambda needs every layer's statistics at once; drop --layers-per-pass")

    selection: ClassVar[str] = "gcs"

    def engine(self) -> GradOTConfig:
        """The scoring, allocation and surgery settings."""
        return GradOTConfig(keep=self.keep, lambda_attn=self.lambda_attn, lambda_mlp=self.lambda_mlp,
                            allocation=self.allocation, selection=self.selection, top_frac=self.top_frac,
                            layer_drop=self.layer_drop, damping=self.damping)


@dataclass(frozen=True)
class AblationConfig(MethodConfig):
    """GradOT's ablations (svd, wanda; ``selection`` names which): no λ, no curvature cost to compare
    matrices with, so the same keep ratio in every matrix."""

    selection: ClassVar[str]
    top_frac: float = same_option(GradOTOptions, "top_frac")

    def engine(self) -> GradOTConfig:
        return GradOTConfig(keep=self.keep, allocation="uniform", selection=self.selection, top_frac=self.top_frac)
