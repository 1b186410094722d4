"""Automatic λ (beyond the paper): the most privacy the utility proxy allows.

Sweeps λ (attention and MLP together) over a log-spaced grid and keeps the largest λ whose emulator
still gives the adapter a gradient close to the original's: its mean adapter-gradient cosine on
held-out calibration text is at least ``threshold`` times the cosine at λ = 0 (curvature only).
A relative threshold is used because the absolute cosine depends on the budget. The model owner
needs no task data for this: calibration text is what it already has.
"""

from __future__ import annotations

from dataclasses import replace

from .config import GradOTConfig
from .build import gradot_emulator
from .units import rescore, score_middle
from ...analysis.proxy import adapter_gradients, cosines, mean_and_stderr
from ...split import Split

DEFAULT_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def auto_lambda(model, split: Split, factors: dict, cfg: GradOTConfig, batches, threshold: float = 0.95,
                grid=DEFAULT_GRID, scores=None) -> tuple[float, list[dict]]:
    """Return ``(λ, curve)``; ``curve`` lists ``{"lambda", "cosine", "stderr"}`` for every λ tried.

    ``batches`` are token-id tensors of held-out calibration text (loss on every token). ``scores``:
    the middle block already scored from ``factors`` (``score_middle``, any λ), else scored here once.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    batches = [{"input_ids": b, "labels": b} for b in batches]
    reference = adapter_gradients(model, split.adapter, batches, desc="auto-λ: original gradients")
    curve = []
    if scores is None:  # once: every λ below re-weights the same SVDs and curvature terms
        scores = score_middle(model, split, factors, replace(cfg, lambda_attn=0.0, lambda_mlp=0.0))
    for lam in (0.0, *sorted(grid)):
        at = replace(cfg, lambda_attn=lam, lambda_mlp=lam)
        emu = gradot_emulator(model, split, at, None, scores=rescore(scores, at))
        grads = adapter_gradients(emu.model, emu.adapter_positions, batches, desc=f"auto-λ: λ={lam}")
        mean, se = mean_and_stderr(cosines(reference, grads))
        curve.append({"lambda": lam, "cosine": mean, "stderr": se})
        del emu
    base = curve[0]["cosine"]
    passing = [c["lambda"] for c in curve if c["cosine"] >= threshold * base]
    return max(passing, default=0.0), curve


def choose_lambda(model, split, factors, cfg: GradOTConfig, batches, threshold: float):
    """The λ chosen on held-out calibration batches (the last quarter), the config and scores at
    that λ, and the manifest's record of the choice."""
    held_out = batches[-max(1, len(batches) // 4):]
    base = score_middle(model, split, factors, cfg)  # scored once for the sweep and the result
    lam, curve = auto_lambda(model, split, factors, cfg, held_out, threshold=threshold, scores=base)
    cfg = replace(cfg, lambda_attn=lam, lambda_mlp=lam)
    return cfg, rescore(base, cfg), {"threshold": threshold, "chosen": lam, "curve": curve}
