"""Wanda-style ablation of GradOT: attention linears truncated by singular value, MLP channels pruned
by weight norm times input activation norm (from calibration text), the same budget in every matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import SimpleMethod, same_option
from .config import AblationConfig, GradOTOptions
from .method import build_gradot_like


@dataclass(frozen=True)
class WandaConfig(AblationConfig):
    selection: ClassVar[str] = "wanda"
    gradient_checkpointing: bool = same_option(GradOTOptions, "gradient_checkpointing")
    layers_per_pass: int | None = same_option(GradOTOptions, "layers_per_pass")


METHOD = SimpleMethod("wanda", "plain SVD + activation-aware channel pruning", WandaConfig, True, build_gradot_like)
