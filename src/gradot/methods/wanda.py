"""Wanda-style ablation of GradOT: attention linears truncated by singular value, MLP channels pruned
by weight norm times input activation norm (from calibration text), the same budget in every matrix."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, same_option
from .gradot.config import GradOTConfig, GradOTOptions


@dataclass(frozen=True)
class WandaConfig(MethodConfig):
    top_frac: float = same_option(GradOTOptions, "top_frac")
    gradient_checkpointing: bool = same_option(GradOTOptions, "gradient_checkpointing")
    layers_per_pass: int | None = same_option(GradOTOptions, "layers_per_pass")

    def engine(self, selection: str = "wanda") -> GradOTConfig:
        return GradOTConfig(keep=self.keep, allocation="uniform", selection=selection, top_frac=self.top_frac)


class Wanda:
    name = "wanda"
    help = "plain SVD + activation-aware channel pruning"
    config = WandaConfig
    needs_calibration = True

    def build(self, model, split, config: WandaConfig, calibration):
        from .gradot.method import build_gradot_like

        return build_gradot_like(model, split, config, calibration, "wanda")
