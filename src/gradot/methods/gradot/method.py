"""The methods built on GradOT's three steps (``units``, ``allocate``, ``build``): ``gradot`` and
its two ablations ``svd`` and ``wanda`` (which share ``build_gradot_like``)."""

from __future__ import annotations

import torch
from torch import nn

from ...emulator import Emulator
from ...split import Split
from .auto_lambda import choose_lambda
from .build import gradot_emulator
from ..base import SimpleMethod
from .config import GradOTOptions


def kfac_products(options) -> dict:
    """``collect_kfac``'s ``products`` and ``token_fraction`` from ``--kfac-bf16`` / ``--kfac-tokens``
    (exact for option classes without them: the svd/wanda ablations)."""
    return {"products": torch.bfloat16 if getattr(options, "kfac_bf16", False) else torch.float32,
            "token_fraction": getattr(options, "kfac_tokens", 1.0)}


def build_gradot_like(model: nn.Module, split: Split, options, calibration) -> Emulator:
    """The emulator of GradOT or of one of its ablations, by ``options``' class (``GradOTOptions``,
    ``AblationConfig``: its ``selection``): factors from ``calibration`` (none for svd), scores,
    allocation, surgery."""
    from ...progress import stage
    from ...stats.kfac import collect_kfac
    from .units import collect_and_score, middle_linears, needs_gradients

    cfg = options.engine()
    selection = cfg.selection
    factors, scores, settings = None, None, {}
    auto = getattr(options, "auto_lambda", None) is not None
    layers_per_pass = getattr(options, "layers_per_pass", None)
    checkpointing = getattr(options, "gradient_checkpointing", False)
    products = kfac_products(options)
    if selection != "svd":
        batches = calibration.batches
        if layers_per_pass:  # large models: a few layers' factors in memory at a time
            scores = collect_and_score(model, split, cfg, batches, layers_per_pass=layers_per_pass,
                                       gradient_checkpointing=checkpointing, **products)
        else:
            factors = collect_kfac(model, middle_linears(model, split, mlp_only=selection == "wanda"), batches,
                                   gradient_checkpointing=checkpointing, gradients=auto or needs_gradients(cfg),
                                   **products)
        settings["calibration"] = calibration.described
        if products["token_fraction"] < 1.0 or products["products"] != torch.float32:  # not the exact factors
            settings["kfac_products"] = {"token_fraction": products["token_fraction"],
                                         "dtype": str(products["products"]).removeprefix("torch.")}
    if auto:
        cfg, scores, settings["auto_lambda"] = choose_lambda(model, split, factors, cfg, batches, options.auto_lambda)
    # Scoring every component and channel, then building the layers: minutes on a CPU, no bar.
    with stage(f"{_NAMES[selection]}: scoring and building the emulator"):
        return gradot_emulator(model, split, cfg, factors, method=_NAMES[selection], settings=settings, scores=scores)


_NAMES = {"gcs": "gradot", "svd": "svd", "wanda": "wanda"}


GRADOT = SimpleMethod("gradot", "KFAC gradient-preserving rank decomposition + channel pruning", GradOTOptions, True,
                      build_gradot_like)
