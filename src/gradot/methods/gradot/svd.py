"""SVD ablation of GradOT: attention linears truncated by singular value, MLP channels pruned by
weight norm, the same budget in every matrix. Needs no calibration text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import SimpleMethod
from .config import AblationConfig
from .method import build_gradot_like


@dataclass(frozen=True)
class SVDConfig(AblationConfig):
    selection: ClassVar[str] = "svd"


METHOD = SimpleMethod("svd", "plain SVD + weight-norm channel pruning", SVDConfig, False, build_gradot_like)
