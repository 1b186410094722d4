"""Step 3 of GradOT, the only one that touches modules (through ``surgery``): a ``Plan`` made into an
emulator; and ``gradot_emulator``, the three steps in a row."""

from __future__ import annotations

from torch import nn

from ...emulator import Emulator, assemble, middle_parameter_count
from ...offload import plain_copy
from ...registry import arch_of, decoder_layers, get_module, set_module
from ...split import Split
from ...surgery import prune_mlp_channels, to_lowrank
from ...errors import MethodConfigError
from ..uniform import layers_to_keep, uniform_indices
from .allocate import Plan, allocate_global, allocate_uniform
from .config import GradOTConfig
from .units import LayerScores, score_middle


def build_from_plan(model: nn.Module, split: Split, scores: list[LayerScores], plan: Plan, *,
                    method: str, cfg: GradOTConfig, settings: dict) -> Emulator:
    arch = arch_of(model)
    originals = decoder_layers(model)
    middle, sources = [], []
    for ls in scores:
        if ls.index in plan.dropped:
            continue
        # Built where its scores were computed: with a device map a layer's weights may rest on
        # the CPU while it runs (and is scored) on the GPU.
        layer = plain_copy(originals[ls.index]).to(ls.mlp.keep_order.device)
        for m in ls.attn:
            r = plan.ranks[ls.index][m.name]
            if r is not None:
                kept = m.keep_order[:r].sort().values
                set_module(layer, m.name, to_lowrank(get_module(layer, m.name), arch, m.svd.U, m.svd.S, m.svd.Vh, kept))
        c = plan.channels[ls.index]
        if c < ls.mlp.channels:
            prune_mlp_channels(layer, arch, ls.mlp.keep_order[:c])
        middle.append(layer)
        sources.append(ls.index)
    settings = dict(settings)
    settings.update({
        "allocation": cfg.allocation, "selection": cfg.selection, "lambda_attn": cfg.lambda_attn,
        "lambda_mlp": cfg.lambda_mlp, "top_frac": cfg.top_frac, "dropped_layers": plan.dropped,
        "score_normalisation": "each term divided by its mean |value| over the matrix's components "
                               "(attention) or the MLP's channels before combining with lambda",
    })
    return assemble(model, split, middle, sources, [None] * len(middle), method=method, keep=cfg.keep,
                    settings=settings)


def _layer_drop(scores: list[LayerScores], share: float, target: int) -> tuple[list[LayerScores], list[int]]:
    """The hybrid's first step: OT†'s evenly spaced whole layers stay (``uniform_indices``), the
    others go before any unit is scored against the budget. (kept scores, dropped original indices)."""
    if not share:
        return scores, []
    n = len(scores)
    stay = set(uniform_indices(n, layers_to_keep(n, 1.0 - share)))
    kept = [ls for i, ls in enumerate(scores) if i in stay]
    room = Plan(ranks={ls.index: {m.name: None for m in ls.attn} for ls in kept},
                channels={ls.index: ls.mlp.channels for ls in kept}).params(kept)
    if room < target:
        raise MethodConfigError(f"layer_drop {share} keeps {len(kept)} of {n} middle layers, {room} parameters: "
                                f"fewer than the budget ({target}); lower --layer-drop or --keep")
    return kept, [ls.index for i, ls in enumerate(scores) if i not in stay]


def gradot_emulator(model: nn.Module, split: Split, cfg: GradOTConfig, factors: dict | None,
                    method: str = "gradot", settings: dict | None = None,
                    scores: list[LayerScores] | None = None) -> Emulator:
    """Score, allocate and cut. ``factors`` from ``kfac.collect_kfac`` over ``middle_linears``, or
    ``scores`` already computed (``collect_and_score``; ``factors`` is then ignored)."""
    if scores is None:
        scores = score_middle(model, split, factors, cfg)
    target = round(cfg.keep * middle_parameter_count(model, split))
    kept, dropped = _layer_drop(scores, cfg.layer_drop, target)
    if cfg.allocation == "uniform":
        plan = allocate_uniform(kept, target)
    else:
        plan = allocate_global(kept, target, layers=cfg.allocation == "global-layers")
    plan.dropped = sorted(plan.dropped + dropped)
    if cfg.layer_drop:
        settings = {**(settings or {}), "layer_drop": cfg.layer_drop}
    if cfg.damping:  # recorded only when set: emulators built without it keep their settings
        settings = {**(settings or {}), "damping": cfg.damping}
    return build_from_plan(model, split, scores, plan, method=method, cfg=cfg, settings=settings or {})
