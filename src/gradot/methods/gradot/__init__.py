"""GradOT: score every middle unit from KFAC curvature (``units``, with the math in ``scores``),
allocate the parameter budget (``allocate``), cut (``method``); ``config`` holds its settings and
``auto_lambda`` the automatic choice of λ."""

from .allocate import Plan, allocate_global, allocate_uniform
from .config import ALLOCATIONS, SELECTIONS, AblationConfig, GradOTConfig, GradOTOptions
from .build import build_from_plan, gradot_emulator
from .method import GRADOT, build_gradot_like, kfac_products
from .units import (
    LayerScores,
    MatrixScores,
    MLPScores,
    collect_and_score,
    middle_linears,
    needs_gradients,
    rescore,
    score_middle,
)

__all__ = ["ALLOCATIONS", "SELECTIONS", "GRADOT", "AblationConfig", "GradOTConfig", "GradOTOptions", "LayerScores", "MLPScores",
           "MatrixScores", "Plan", "allocate_global", "allocate_uniform", "build_from_plan", "build_gradot_like",
           "collect_and_score", "gradot_emulator", "kfac_products", "middle_linears", "needs_gradients", "rescore", "score_middle"]
