"""GradOT emulators: score every middle unit, allocate the parameter budget, then cut.

Three steps with one job each:

1. ``score_middle``: KFAC factors -> per-unit scores (singular components of attention linears,
   MLP channels, whole layers), through the pure functions of ``scores``.
2. ``allocate_uniform`` / ``allocate_global``: scores + budget -> a ``Plan`` (which components,
   channels and layers survive). Pure bookkeeping, no modules.
3. ``build_from_plan``: the only step that touches modules (through ``surgery``).

Budget accounting counts the middle block's parameters exactly as the emulator will store them:
a rank-r factor pair costs ``r (in + out)``, and a matrix whose kept rank would not save
parameters stays dense.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .emulator import Emulator, assemble, middle_parameter_count
from .registry import ArchSpec, arch_of, decoder_layers, get_module, set_module
from .scores import (
    DRDScores,
    drd_scores,
    magnitude_channel_scores,
    scp_scores,
    wanda_channel_scores,
)
from .split import Split
from .surgery import dense_weight, linear_shape, lowrank_saves_params, prune_mlp_channels, to_lowrank

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

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection != "gcs" and self.allocation != "uniform":
            raise ValueError("the svd/wanda ablations have no curvature cost: use allocation 'uniform'")


# ---------------------------------------------------------------------------------------------
# Scores


@dataclass
class MatrixScores:
    name: str
    in_f: int
    out_f: int
    bias: bool
    svd: DRDScores | None  # None: dense-only (never factorised)
    keep_order: torch.Tensor  # component indices, most worth keeping first (protected ones lead)
    cost: torch.Tensor  # global removal cost per component (curvature units), aligned with S
    protected: int  # leading entries of keep_order that are never removed

    @property
    def dense_params(self) -> int:
        return self.in_f * self.out_f

    def stored_params(self, rank: int) -> int:
        lowrank = rank * (self.in_f + self.out_f)
        return lowrank if lowrank < self.dense_params else self.dense_params


@dataclass
class MLPScores:
    channels: int
    per_channel: int  # parameters one channel holds (rows of in-projections + down column + in biases)
    keep_order: torch.Tensor  # most worth keeping first
    cost: torch.Tensor  # global removal cost per channel


@dataclass
class LayerScores:
    index: int  # original layer index
    params: int
    fixed: int  # parameters no unit removal touches (norms, out biases)
    attn: list[MatrixScores]
    mlp: MLPScores
    cost: float  # cost of removing the whole layer (its output linears zeroed: the layer is identity)


def _matrix_scores(name, module, f, lam, cfg: GradOTConfig) -> MatrixScores:
    in_f, out_f, bias = linear_shape(module)
    W = dense_weight(module).detach()
    if f is None:  # svd ablation: no statistics needed
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        svd = DRDScores(U, S, Vh, S, torch.zeros_like(S), S, 1.0, 1.0, 1.0, 1.0, 0.0)
    else:
        svd = drd_scores(W, f.A, f.G, f.grad, lam)
    S = svd.S
    n_top = min(len(S), max(1, math.ceil(cfg.top_frac * len(S))))
    protected = torch.arange(n_top)  # S is sorted descending
    rest = torch.arange(n_top, len(S))
    if cfg.selection == "gcs":
        rest = rest[svd.gcs[rest].argsort(descending=True)]
    keep_order = torch.cat([protected, rest])
    cost = svd.gcs * svd.scale_hess  # back to curvature units so matrices compare
    return MatrixScores(name, in_f, out_f, bias, svd, keep_order, cost, n_top)


def _mlp_scores(layer, arch: ArchSpec, factors, cfg: GradOTConfig, prefix: str) -> MLPScores:
    ins = [get_module(layer, n) for n in arch.mlp_in]
    down = get_module(layer, arch.mlp_out)
    W_ins = [dense_weight(m).detach() for m in ins]
    W_down = dense_weight(down).detach()
    channels = W_down.shape[1]
    per_channel = sum(W.shape[1] + (m.bias is not None) for W, m in zip(W_ins, ins)) + W_down.shape[0]
    if cfg.selection == "svd":
        score = magnitude_channel_scores(W_ins, W_down)
        cost = score
    elif cfg.selection == "wanda":
        score = wanda_channel_scores(W_ins, W_down, factors[f"{prefix}{arch.mlp_out}"].A)
        cost = score
    else:
        fs = [factors[f"{prefix}{n}"] for n in arch.mlp_in]
        fd = factors[f"{prefix}{arch.mlp_out}"]
        s = scp_scores([(W, f.A, f.G, f.grad) for W, f in zip(W_ins, fs)], (W_down, fd.A, fd.G, fd.grad), cfg.lambda_mlp)
        score = s.gcs
        cost = s.gcs * s.scale_hess
    return MLPScores(channels, per_channel, score.argsort(descending=True), cost)


def _removal_cost(module, f, lam: float, scale_h: float, scale_f: float) -> float:
    """GCS of zeroing a whole linear, ``||G W A||_1 - lam <grad, -W> (scale_h / scale_f)``."""
    W = dense_weight(module).detach().float()
    hess = float((f.G @ W @ f.A).abs().sum())
    first = float(-(f.grad * W).sum())
    return hess - lam * first * scale_h / scale_f


def score_middle(model: nn.Module, split: Split, factors: dict | None, cfg: GradOTConfig) -> list[LayerScores]:
    """Scores of every unit of every middle layer. ``factors`` are KFAC factors keyed by
    ``<layers>.<index>.<linear>`` (None for the svd ablation, which needs none)."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    out = []
    for i in split.middle:
        layer = layers[i]
        prefix = f"{arch.layers}.{i}."
        attn = [
            _matrix_scores(n, get_module(layer, n), factors[prefix + n] if factors and cfg.selection == "gcs" else None,
                           cfg.lambda_attn, cfg)
            for n in arch.attn_linears
        ]
        mlp = _mlp_scores(layer, arch, factors, cfg, prefix)
        unit_params = sum(m.dense_params for m in attn) + mlp.channels * mlp.per_channel
        params = sum(p.numel() for p in layer.parameters())
        cost = math.inf
        if factors is not None and cfg.selection == "gcs":
            o = next(m for m in attn if m.name == arch.attn_out[-1])
            cost = _removal_cost(get_module(layer, arch.attn_out[-1]), factors[prefix + arch.attn_out[-1]],
                                 cfg.lambda_attn, o.svd.scale_hess, o.svd.scale_first)
            cost += _removal_cost(get_module(layer, arch.mlp_out), factors[prefix + arch.mlp_out],
                                  cfg.lambda_mlp, 1.0, 1.0)
        out.append(LayerScores(i, params, params - unit_params, attn, mlp, cost))
    return out


# ---------------------------------------------------------------------------------------------
# Allocation


@dataclass
class Plan:
    """What survives: per middle layer (original index) ranks (None = dense) and channel count."""

    ranks: dict[int, dict[str, int | None]] = field(default_factory=dict)
    channels: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)

    def params(self, scores: list[LayerScores]) -> int:
        total = 0
        for ls in scores:
            if ls.index in self.dropped:
                continue
            total += ls.fixed + self.channels[ls.index] * ls.mlp.per_channel
            for m in ls.attn:
                r = self.ranks[ls.index][m.name]
                total += m.dense_params if r is None else m.stored_params(r)
        return total


def _rank_or_dense(m: MatrixScores, rank: int) -> int | None:
    return rank if lowrank_saves_params(m.in_f, m.out_f, rank) else None


def allocate_uniform(scores: list[LayerScores], target: int) -> Plan:
    """The same keep ratio in every matrix and MLP, then the rounding remainder handed out unit by
    unit so the achieved size lands within one unit of the target."""
    fixed = sum(ls.fixed for ls in scores)
    units = sum(sum(m.dense_params for m in ls.attn) + ls.mlp.channels * ls.mlp.per_channel for ls in scores)
    ratio = min(1.0, max(0.0, (target - fixed) / units))
    plan = Plan()
    if ratio >= 1.0:  # nothing to remove: every matrix dense, every channel kept
        for ls in scores:
            plan.ranks[ls.index] = {m.name: None for m in ls.attn}
            plan.channels[ls.index] = ls.mlp.channels
        return plan
    for ls in scores:
        plan.ranks[ls.index] = {}
        for m in ls.attn:
            rank = max(1, math.floor(ratio * m.dense_params / (m.in_f + m.out_f)))
            plan.ranks[ls.index][m.name] = _rank_or_dense(m, rank)
        plan.channels[ls.index] = max(1, min(ls.mlp.channels, math.floor(ratio * ls.mlp.channels)))
    # Hand out what rounding left, cheapest-to-grow units first, never overshooting.
    grew = True
    while grew:
        grew = False
        for ls in scores:
            room = target - plan.params(scores)
            if plan.channels[ls.index] < ls.mlp.channels and ls.mlp.per_channel <= room:
                plan.channels[ls.index] += 1
                grew = True
            for m in ls.attn:
                r = plan.ranks[ls.index][m.name]
                room = target - plan.params(scores)
                if r is not None and m.in_f + m.out_f <= room and _rank_or_dense(m, r + 1) is not None:
                    plan.ranks[ls.index][m.name] = r + 1
                    grew = True
    return plan


def allocate_global(scores: list[LayerScores], target: int, layers: bool = False) -> Plan:
    """Remove, across the whole middle block, the units with the lowest curvature cost per
    parameter saved until the block fits ``target``: singular components, MLP channels and (with
    ``layers``) whole layers. A matrix whose remaining rank saves nothing is stored dense."""
    candidates = []  # (cost per parameter, kind, layer, detail)
    for li, ls in enumerate(scores):
        for mi, m in enumerate(ls.attn):
            for j in m.keep_order[m.protected:].tolist():
                candidates.append((float(m.cost[j]) / (m.in_f + m.out_f), "component", li, (mi, j)))
        for c in ls.mlp.keep_order[1:].tolist():  # keep at least one channel
            candidates.append((float(ls.mlp.cost[c]) / ls.mlp.per_channel, "channel", li, c))
        if layers and len(scores) > 1:
            candidates.append((ls.cost / ls.params, "layer", li, None))
    # On equal cost per parameter a whole layer goes first: same damage, a shallower (faster) emulator.
    candidates.sort(key=lambda c: (c[0], c[1] != "layer"))

    full_rank = [[len(m.svd.S) for m in ls.attn] for ls in scores]
    rank = [list(r) for r in full_rank]
    channels = [ls.mlp.channels for ls in scores]
    dropped = [False] * len(scores)

    def layer_params(li):
        ls = scores[li]
        if dropped[li]:
            return 0
        return ls.fixed + channels[li] * ls.mlp.per_channel + sum(
            m.stored_params(r) for m, r in zip(ls.attn, rank[li]))

    def step(kind, li, detail, delta):
        if kind == "component":
            rank[li][detail[0]] += delta
        else:
            channels[li] += delta

    per_layer = [layer_params(li) for li in range(len(scores))]
    total = sum(per_layer)
    removed = []
    for _, kind, li, detail in candidates:
        if total <= target:
            break
        if dropped[li]:
            continue
        if kind == "layer":
            if sum(not d for d in dropped) == 1:  # never drop the last middle layer
                continue
            dropped[li] = True
        else:
            step(kind, li, detail, -1)
            removed.append((kind, li, detail))
        new = layer_params(li)
        total += new - per_layer[li]
        per_layer[li] = new
    # Dropping a whole layer can overshoot: give back the most costly removed units that fit.
    for kind, li, detail in reversed(removed):
        if dropped[li]:
            continue
        step(kind, li, detail, +1)
        new = layer_params(li)
        if total + new - per_layer[li] <= target:
            total += new - per_layer[li]
            per_layer[li] = new
        else:
            step(kind, li, detail, -1)

    plan = Plan(dropped=[ls.index for ls, d in zip(scores, dropped) if d])
    for li, ls in enumerate(scores):
        plan.ranks[ls.index] = {m.name: _rank_or_dense(m, r) for m, r in zip(ls.attn, rank[li])}
        plan.channels[ls.index] = channels[li]
    return plan


# ---------------------------------------------------------------------------------------------
# Surgery


def build_from_plan(model: nn.Module, split: Split, scores: list[LayerScores], plan: Plan, *,
                    method: str, cfg: GradOTConfig, settings: dict) -> Emulator:
    arch = arch_of(model)
    originals = decoder_layers(model)
    middle, sources = [], []
    for ls in scores:
        if ls.index in plan.dropped:
            continue
        layer = copy.deepcopy(originals[ls.index])
        for m in ls.attn:
            r = plan.ranks[ls.index][m.name]
            if r is not None:
                keep = m.keep_order[:r].sort().values
                set_module(layer, m.name, to_lowrank(get_module(layer, m.name), m.svd.U, m.svd.S, m.svd.Vh, keep))
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


def middle_linears(model: nn.Module, split: Split, mlp_only: bool = False) -> dict[str, nn.Module]:
    """Name -> module of every linear compression scores (keys match ``score_middle``)."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    names = arch.mlp_linears if mlp_only else arch.attn_linears + arch.mlp_linears
    return {f"{arch.layers}.{i}.{n}": get_module(layers[i], n) for i in split.middle for n in names}


def gradot_emulator(model: nn.Module, split: Split, cfg: GradOTConfig, factors: dict | None,
                    method: str = "gradot", settings: dict | None = None) -> Emulator:
    """Score, allocate and cut. ``factors`` from ``kfac.collect_kfac`` over ``middle_linears``."""
    scores = score_middle(model, split, factors, cfg)
    target = round(cfg.keep * middle_parameter_count(model, split))
    if cfg.allocation == "uniform":
        plan = allocate_uniform(scores, target)
    else:
        plan = allocate_global(scores, target, layers=cfg.allocation == "global-layers")
    return build_from_plan(model, split, scores, plan, method=method, cfg=cfg, settings=settings or {})
