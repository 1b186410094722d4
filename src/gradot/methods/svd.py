"""SVD ablation of GradOT: attention linears truncated by singular value, MLP channels pruned by
weight norm, the same budget in every matrix. Needs no calibration text."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, same_option
from .gradot.config import GradOTConfig, GradOTOptions


@dataclass(frozen=True)
class SVDConfig(MethodConfig):
    top_frac: float = same_option(GradOTOptions, "top_frac")

    def engine(self, selection: str = "svd") -> GradOTConfig:
        return GradOTConfig(keep=self.keep, allocation="uniform", selection=selection, top_frac=self.top_frac)


class SVD:
    name = "svd"
    help = "plain SVD + weight-norm channel pruning"
    config = SVDConfig
    needs_calibration = False

    def build(self, model, split, config: SVDConfig, calibration=None):
        from .gradot.method import build_gradot_like

        return build_gradot_like(model, split, config, None, "svd")
