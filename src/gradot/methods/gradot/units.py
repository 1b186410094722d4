"""Step 1 of GradOT: KFAC factors -> a score for every unit of the middle block (singular
components of attention linears, MLP channels, whole layers), through the pure functions of
``scores``. ``collect_and_score`` collects the factors and scores them, optionally a few layers per
forward-backward pass with each chunk's factors freed before the next (models whose factors do not
fit in memory at once)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ...offload import onloaded
from ...registry import ArchSpec, arch_of, decoder_layers, get_module, linear_shape, weight_out_in
from ...split import Split
from ...stats.kfac import damped
from .config import GradOTConfig
from .scores import (
    DRDScores,
    SCPScores,
    drd_scores,
    magnitude_channel_scores,
    protected_count,
    scp_scores,
    thin_svd,
    wanda_channel_scores,
    with_lambda,
)


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
    scp: SCPScores | None = None  # the curvature scores (gcs selection), kept to re-weight λ


@dataclass
class LayerScores:
    index: int  # original layer index
    params: int
    fixed: int  # parameters no unit removal touches (norms, out biases)
    attn: list[MatrixScores]
    mlp: MLPScores
    cost: float  # cost of removing the whole layer (its output linears zeroed: the layer is identity);
    # computed only for allocation "global-layers" (its one consumer), math.inf otherwise
    removal: tuple[RemovalTerms, RemovalTerms] | None = None  # (attention out, MLP down) terms of `cost`
    has_grad: bool = False  # the factors carried weight gradients: the first-order terms are real


@dataclass(frozen=True)
class RemovalTerms:
    """``GCS`` of zeroing a whole linear is ``hess - lam * first * ratio``."""

    hess: float
    first: float
    ratio: float  # scale_hess / scale_first of the units the λ is normalised over (matrix; MLP channels)

    def cost(self, lam: float) -> float:
        return self.hess if lam == 0 else self.hess - lam * self.first * self.ratio


def _grad(f, W: torch.Tensor, lam: float) -> torch.Tensor:
    """``f.grad``, or zeros when the factors were collected without gradients (first-order term 0)."""
    if f.grad is not None:
        return f.grad
    if lam != 0:
        raise ValueError("a nonzero lambda needs KFAC factors collected with gradients=True")
    return torch.zeros(W.shape, dtype=torch.float32, device=f.G.device)


def _matrix_scores(name, module, arch: ArchSpec, f, lam, cfg: GradOTConfig) -> MatrixScores:
    out_f, in_f = linear_shape(module, arch)
    bias = module.bias is not None
    W = weight_out_in(module, arch).detach()
    if f is None:  # svd ablation: no statistics needed
        U, S, Vh = thin_svd(W.float())
        svd = DRDScores(U, S, Vh, S, torch.zeros_like(S), S, 1.0, 1.0, 1.0, 1.0, 0.0)
    else:
        svd = drd_scores(W, f.A, f.G, _grad(f, W, lam), lam)
    return _order_components(MatrixScores(name, in_f, out_f, bias, svd, None, None, 0), cfg)


def _order_components(m: MatrixScores, cfg: GradOTConfig) -> MatrixScores:
    """Fill ``keep_order``, ``cost`` and ``protected`` from ``m.svd`` (its λ decides the order)."""
    svd = m.svd
    S = svd.S
    n_top = max(1, protected_count(len(S), cfg.top_frac, len(S)))  # at least one component survives
    protected = torch.arange(n_top, device=S.device)  # S is sorted descending
    rest = torch.arange(n_top, len(S), device=S.device)
    if cfg.selection == "gcs":
        rest = rest[svd.gcs[rest].argsort(descending=True)]
    keep_order = torch.cat([protected, rest])
    cost = svd.gcs * svd.scale_hess  # back to curvature units so matrices compare
    return replace(m, keep_order=keep_order, cost=cost, protected=n_top)


def _mlp_scores(layer, arch: ArchSpec, factors, cfg: GradOTConfig, prefix: str) -> MLPScores:
    ins = [get_module(layer, n) for n in arch.mlp_in]
    down = get_module(layer, arch.mlp_out)
    W_ins = [weight_out_in(m, arch).detach() for m in ins]
    W_down = weight_out_in(down, arch).detach()
    channels = W_down.shape[1]
    per_channel = sum(arch.mlp_in_parts * (W.shape[1] + (m.bias is not None)) for W, m in zip(W_ins, ins))
    per_channel += W_down.shape[0]
    if cfg.selection == "svd":
        score = magnitude_channel_scores(W_ins, W_down)
        cost = score
    elif cfg.selection == "wanda":
        score = wanda_channel_scores(W_ins, W_down, factors[f"{prefix}{arch.mlp_out}"].A)
        cost = score
    else:
        fs = [factors[f"{prefix}{n}"] for n in arch.mlp_in]
        fd = factors[f"{prefix}{arch.mlp_out}"]
        lam = cfg.lambda_mlp
        s = scp_scores([(W, f.A, f.G, _grad(f, W, lam)) for W, f in zip(W_ins, fs)],
                       (W_down, fd.A, fd.G, _grad(fd, W_down, lam)), lam)
        return _order_channels(MLPScores(channels, per_channel, None, None, s))
    return MLPScores(channels, per_channel, score.argsort(descending=True), cost)


def _order_channels(m: MLPScores) -> MLPScores:
    """Fill ``keep_order`` and ``cost`` from the curvature scores ``m.scp`` (its λ decides)."""
    return replace(m, keep_order=m.scp.gcs.argsort(descending=True), cost=m.scp.gcs * m.scp.scale_hess)


def _removal_terms(module, arch: ArchSpec, f, ratio: float) -> RemovalTerms:
    """Terms of zeroing a whole linear: ``||G W A||_1`` and ``<grad, -W>`` (0 without gradients)."""
    W = weight_out_in(module, arch).detach().float()
    hess = float((f.G @ W @ f.A).abs().sum())
    first = float(-(f.grad * W).sum()) if f.grad is not None else 0.0
    return RemovalTerms(hess, first, ratio)


def score_middle(model: nn.Module, split: Split, factors: dict | None, cfg: GradOTConfig,
                 layers: list[int] | None = None) -> list[LayerScores]:
    """Scores of every unit of every middle layer (or of the middle layers ``layers`` only).
    ``factors`` are KFAC factors keyed by ``<layers>.<index>.<linear>`` (None for the svd ablation,
    which needs none). A whole layer's removal cost (a materialised ``G W A`` product per output
    linear) is only computed for the ``global-layers`` allocation, its one consumer. ``cfg.damping``
    damps the factors (``kfac.damped``) before anything is scored."""
    arch = arch_of(model)
    indices = split.middle if layers is None else list(layers)
    decoder = decoder_layers(model)
    if factors is not None and cfg.damping:
        factors = damped(factors, cfg.damping)
    out = []
    for i in indices:
        layer = decoder[i]
        with onloaded(layer):  # weights a device map offloaded, for this layer only
            out.append(_layer_scores(i, layer, arch, factors, cfg))
    return out


def _layer_scores(i: int, layer: nn.Module, arch: ArchSpec, factors: dict | None, cfg: GradOTConfig) -> LayerScores:
    prefix = f"{arch.layers}.{i}."
    attn = [
        _matrix_scores(n, get_module(layer, n), arch, factors[prefix + n] if factors and cfg.selection == "gcs" else None,
                       cfg.lambda_attn, cfg)
        for n in arch.attn_linears
    ]
    mlp = _mlp_scores(layer, arch, factors, cfg, prefix)
    unit_params = sum(m.dense_params for m in attn) + mlp.channels * mlp.per_channel
    params = sum(p.numel() for p in layer.parameters())
    scored = LayerScores(i, params, params - unit_params, attn, mlp, math.inf)
    if factors is not None and cfg.selection == "gcs":
        scored.has_grad = factors[prefix + arch.mlp_out].grad is not None
        if cfg.allocation == "global-layers":
            o = next(m for m in attn if m.name == arch.attn_out[-1])
            scored.removal = (
                _removal_terms(get_module(layer, arch.attn_out[-1]), arch, factors[prefix + arch.attn_out[-1]],
                               o.svd.scale_hess / o.svd.scale_first),
                # λ is normalised like the channels' (the units a layer competes with)
                _removal_terms(get_module(layer, arch.mlp_out), arch, factors[prefix + arch.mlp_out],
                               mlp.scp.scale_hess / mlp.scp.scale_first),
            )
            scored.cost = _layer_cost(scored, cfg)
    return scored


def _layer_cost(ls: LayerScores, cfg: GradOTConfig) -> float:
    attn, mlp = ls.removal
    return attn.cost(cfg.lambda_attn) + mlp.cost(cfg.lambda_mlp)


def rescore(scores: list[LayerScores], cfg: GradOTConfig) -> list[LayerScores]:
    """``scores`` (from ``score_middle`` with the GCS selection) re-weighted to ``cfg``'s λs.

    Only the weighted sum of the normalised curvature and first-order terms depends on λ, so this
    reuses every SVD and curvature product: a λ sweep costs one scoring plus one cheap re-weighting
    per λ. A nonzero λ needs scores computed from factors with gradients.
    """
    if cfg.selection != "gcs":
        raise ValueError("rescore re-weights GCS scores; the svd/wanda selections have no λ")
    out = []
    for ls in scores:
        if (cfg.lambda_attn or cfg.lambda_mlp) and not ls.has_grad:
            raise ValueError("a nonzero lambda needs KFAC factors collected with gradients=True")
        if ls.mlp.scp is None:
            raise ValueError(f"layer {ls.index}: no curvature scores to re-weight (scored without factors)")
        attn = [_order_components(replace(m, svd=with_lambda(m.svd, cfg.lambda_attn)), cfg) for m in ls.attn]
        mlp = _order_channels(replace(ls.mlp, scp=with_lambda(ls.mlp.scp, cfg.lambda_mlp)))
        new = replace(ls, attn=attn, mlp=mlp)
        if ls.removal is not None and cfg.allocation == "global-layers":
            new.cost = _layer_cost(new, cfg)
        out.append(new)
    return out


def middle_linears(model: nn.Module, split: Split, mlp_only: bool = False,
                   layers: list[int] | None = None) -> dict[str, nn.Module]:
    """Name -> module of every linear compression scores (keys match ``score_middle``), of every
    middle layer or of the middle layers ``layers`` only."""
    arch = arch_of(model)
    modules = decoder_layers(model)
    names = arch.mlp_linears if mlp_only else arch.attn_linears + arch.mlp_linears
    indices = split.middle if layers is None else list(layers)
    return {f"{arch.layers}.{i}.{n}": get_module(modules[i], n) for i in indices for n in names}


def needs_gradients(cfg: GradOTConfig) -> bool:
    """Whether scoring with ``cfg`` uses the KFAC ``grad`` (the first-order term, lambda != 0)."""
    return cfg.selection == "gcs" and (cfg.lambda_attn != 0 or cfg.lambda_mlp != 0)


def collect_and_score(model: nn.Module, split: Split, cfg: GradOTConfig, batches, *,
                      layers_per_pass: int | None = None, gradient_checkpointing: bool = False,
                      gradients: bool | None = None, progress: bool = True,
                      timings: dict | None = None, products: torch.dtype = torch.float32,
                      token_fraction: float = 1.0) -> list[LayerScores]:
    """KFAC statistics over ``batches`` and the scores of every middle layer.

    ``layers_per_pass=None`` collects every middle layer's factors in one forward-backward pass
    and scores them (what ``gradot_emulator`` does with precomputed factors). With
    ``layers_per_pass=n``, the middle layers are processed ``n`` at a time: one forward-backward
    pass over all of ``batches`` per chunk, whose factors are scored and freed before the next, so
    factor memory is that of ``n`` layers (plus the scores kept: the attention SVDs and per-unit
    vectors); the time grows with the number of chunks (each repeats the forward). Both give the
    same scores. ``gradients=None`` collects ``grad`` only when ``cfg`` needs it. ``timings``, if
    given, receives ``statistics_s`` and ``scores_s``. ``products`` and ``token_fraction``: precision
    of the ``A``/``G`` products and the share of tokens they run over (``collect_kfac``).
    """
    from ...stats.kfac import collect_kfac  # kfac imports nothing from here; keep the import light

    if cfg.selection == "svd":
        raise ValueError("the svd ablation needs no statistics: call score_middle(model, split, None, cfg)")
    if gradients is None:
        gradients = needs_gradients(cfg)
    middle = split.middle
    step = len(middle) if not layers_per_pass else int(layers_per_pass)
    if step < 1:
        raise ValueError(f"layers_per_pass must be >= 1, got {layers_per_pass}")
    batches = list(batches)  # iterated once per chunk
    scores: list[LayerScores] = []
    t_stats = t_scores = 0.0
    for start in range(0, len(middle), step):
        chunk = middle[start:start + step]
        t0 = time.perf_counter()
        factors = collect_kfac(model, middle_linears(model, split, mlp_only=cfg.selection == "wanda", layers=chunk),
                               batches, progress=progress, gradient_checkpointing=gradient_checkpointing,
                               gradients=gradients, products=products, token_fraction=token_fraction)
        t1 = time.perf_counter()
        scores += score_middle(model, split, factors, cfg, layers=chunk)
        del factors  # freed before the next chunk's pass
        t_scores += time.perf_counter() - t1
        t_stats += t1 - t0
    if timings is not None:
        timings["statistics_s"] = t_stats
        timings["scores_s"] = t_scores
    return scores
