"""Gradient-preserving Compression Scores (GCS): pure functions, tensors in, scores out.

Notation as in docs/method.md, section 2. A linear layer is ``y = W x`` with ``W`` of shape ``out x in``
(GPT-2 ``Conv1D`` weights must be transposed by the caller). Its KFAC statistics are

* ``A = E[x x^T]``      (in x in),
* ``G = E[g g^T]``      (out x out), ``g = dl/dy``,
* ``grad = dl/dW``      (out x in, same shape as ``W``),

and the curvature of a weight change ``Delta`` is approximated by ``H Delta ~= G Delta A``. For a
change ``delta`` a compression makes,

    GCS(delta) = || G Delta A ||_1  -  lam * <grad, Delta>.

Both compressions below remove rank-one pieces ``Delta = a b^T``, and
``|| G a b^T A ||_1 = ||G a||_1 * ||A^T b||_1`` (``A`` is symmetric), so every unit's score has a
closed form and all units of a matrix are scored with a few batched matrix products.

**Normalisation.** The Hessian term and the first-order term have different units. Each is divided
by its mean absolute value over the units of the matrix (DRD) or of the channel set (SCP) before they
are combined, so one ``lam`` means the same thing in every layer and model. A median-absolute
("robust") scale is reported beside it for diagnostics, because first-order terms are heavy-tailed.
The raw (un-normalised) terms are returned too, for budget allocation across matrices.

Conventions: high GCS = costly to remove = keep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = [
    "DRDScores",
    "SCPScores",
    "drd_scores",
    "with_lambda",
    "drd_select",
    "protected_count",
    "svd_select",
    "scp_scores",
    "magnitude_channel_scores",
    "wanda_channel_scores",
    "mean_abs_scale",
    "median_abs_scale",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32)


def mean_abs_scale(t: Tensor) -> float:
    """Mean absolute value of ``t``; 1.0 when that is zero or not finite (so dividing is a no-op)."""
    if t.numel() == 0:
        return 1.0
    s = float(t.detach().abs().float().mean())
    return s if (s > 0.0 and math.isfinite(s)) else 1.0


def median_abs_scale(t: Tensor) -> float:
    """Median absolute value of ``t`` (robust scale, diagnostics only); 1.0 when zero/not finite."""
    if t.numel() == 0:
        return 1.0
    s = float(t.detach().abs().float().median())
    return s if (s > 0.0 and math.isfinite(s)) else 1.0


def _check_square(name: str, M: Tensor, n: int) -> None:
    if M.shape != (n, n):
        raise ValueError(f"{name} must be {n}x{n}, got {tuple(M.shape)}")


# --------------------------------------------------------------------------------------------
# DRD: Dynamic Rank Decomposition (attention projections)
# --------------------------------------------------------------------------------------------


@dataclass
class DRDScores:
    """Per-component scores of ``W = U diag(S) Vh`` (float32, ``full_matrices=False``).

    Attributes:
        U: ``out x r`` left singular vectors (columns ``u_j``).
        S: ``r`` singular values, descending.
        Vh: ``r x in`` right singular vectors (rows ``v_j^T``).
        hess: raw Hessian term ``s_j * ||G u_j||_1 * ||A v_j||_1`` (>= 0).
        first: raw first-order term ``<grad, Delta_j> = -s_j * u_j^T grad v_j``.
        gcs: ``hess / scale_hess - lam * first / scale_first``.
        scale_hess: mean |hess| over the components (1.0 if zero).
        scale_first: mean |first| over the components (1.0 if zero).
        robust_scale_hess: median |hess| (diagnostics).
        robust_scale_first: median |first| (diagnostics).
        lam: the lambda used for ``gcs``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    hess: Tensor
    first: Tensor
    gcs: Tensor
    scale_hess: float
    scale_first: float
    robust_scale_hess: float
    robust_scale_first: float
    lam: float


def _scales(hess: Tensor, first: Tensor) -> dict[str, float]:
    """Each term's mean |value| (what the GCS divides it by) and median |value| (diagnostics)."""
    return {"scale_hess": mean_abs_scale(hess), "scale_first": mean_abs_scale(first),
            "robust_scale_hess": median_abs_scale(hess), "robust_scale_first": median_abs_scale(first)}


def _gcs(hess: Tensor, first: Tensor, scale_hess: float, scale_first: float, lam: float) -> Tensor:
    return hess / scale_hess - lam * first / scale_first


def with_lambda(scores, lam: float):
    """``scores`` (``DRDScores`` or ``SCPScores``) at another ``lam``: only the weighted sum of the
    two normalised terms depends on it, so no SVD or curvature product is recomputed."""
    return replace(scores, gcs=_gcs(scores.hess, scores.first, scores.scale_hess, scores.scale_first, lam),
                   lam=float(lam))


def thin_svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh`` of ``W`` (thin). On CUDA, cuSOLVER's default driver needs ~0.25 s for one
    2048 x 2048 matrix (SVDs were 65% of GradOT's time on a 1B model on an H100); ``gesvda`` needs
    ~0.03 s but is approximate for ill-conditioned matrices, so its result is kept only when it
    reconstructs ``W`` to 1e-4 (relative); otherwise the exact driver runs."""
    if W.is_cuda:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False, driver="gesvda")
        if bool(torch.isfinite(S).all()) and float(((U * S) @ Vh - W).norm()) <= 1e-4 * float(W.norm()):
            return U, S, Vh
    return torch.linalg.svd(W, full_matrices=False)


def drd_scores(W: Tensor, A: Tensor, G: Tensor, grad: Tensor, lam: float) -> DRDScores:
    """Score every singular component of ``W`` (out x in) for removal.

    Removing component ``j`` is ``Delta_j = -s_j u_j v_j^T``, hence

        hess_j  = ||G Delta_j A||_1 = s_j * ||G u_j||_1 * ||A v_j||_1
        first_j = <grad, Delta_j>   = -s_j * u_j^T grad v_j
        GCS_j   = hess_j / mean|hess| - lam * first_j / mean|first|

    Args:
        W: weight, ``out x in``.
        A: input factor ``E[x x^T]``, ``in x in`` (symmetric PSD).
        G: output-gradient factor ``E[g g^T]``, ``out x out`` (symmetric PSD).
        grad: weight gradient, ``out x in``.
        lam: weight of the first-order (privacy) term.
    """
    W, A, G, grad = _f32(W), _f32(A), _f32(G), _f32(grad)
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out x in), got shape {tuple(W.shape)}")
    n_out, n_in = W.shape
    _check_square("A", A, n_in)
    _check_square("G", G, n_out)
    if grad.shape != W.shape:
        raise ValueError(f"grad must have W's shape {tuple(W.shape)}, got {tuple(grad.shape)}")

    U, S, Vh = thin_svd(W)
    # Column j of G @ U is G u_j; column j of A @ Vh^T is A v_j.
    hess = S * (G @ U).abs().sum(dim=0) * (A @ Vh.T).abs().sum(dim=0)
    # u_j^T grad v_j for all j at once: row j of (U^T grad) dotted with row j of Vh.
    first = -S * ((U.T @ grad) * Vh).sum(dim=1)

    scales = _scales(hess, first)
    gcs = _gcs(hess, first, scales["scale_hess"], scales["scale_first"], lam)
    return DRDScores(U=U, S=S, Vh=Vh, hess=hess, first=first, gcs=gcs, lam=float(lam), **scales)


def protected_count(n: int, top_frac: float, rank: int) -> int:
    # round() first so that e.g. 0.05 * 60 = 3.0000000000000004 does not become 4.
    return min(max(math.ceil(round(max(top_frac, 0.0) * n, 9)), 0), rank)


def drd_select(S: Tensor, gcs: Tensor, rank: int, top_frac: float = 0.05) -> Tensor:
    """Indices of the components to keep (ascending ``LongTensor`` of exactly ``min(rank, len)``).

    The top ``ceil(top_frac * len)`` components by singular value are kept unconditionally (capped at
    ``rank``); the rest of the rank is filled with the highest-GCS components among the others.
    Ties go to the lower index (the larger singular value); NaN scores rank last.
    """
    if S.dim() != 1 or gcs.shape != S.shape:
        raise ValueError(f"S and gcs must be 1-D of equal length, got {tuple(S.shape)}, {tuple(gcs.shape)}")
    n = S.numel()
    rank = max(0, min(int(rank), n))
    keep = torch.zeros(n, dtype=torch.bool, device=S.device)
    n_top = protected_count(n, top_frac, rank)
    if n_top > 0:
        keep[torch.argsort(S, descending=True, stable=True)[:n_top]] = True
    n_fill = rank - n_top
    if n_fill > 0:
        cand = (~keep).nonzero().squeeze(1)
        score = torch.nan_to_num(gcs[cand].float(), nan=-math.inf)
        keep[cand[torch.argsort(score, descending=True, stable=True)[:n_fill]]] = True
    return keep.nonzero().squeeze(1)


def svd_select(S: Tensor, rank: int) -> Tensor:
    """Plain truncated-SVD baseline: indices (ascending) of the ``rank`` largest singular values."""
    rank = max(0, min(int(rank), S.numel()))
    idx = torch.argsort(S, descending=True, stable=True)[:rank]
    return torch.sort(idx).values


# --------------------------------------------------------------------------------------------
# SCP: Selective Channel Pruning (MLP intermediate channels)
# --------------------------------------------------------------------------------------------

Projection = tuple[Tensor, Tensor, Tensor, Tensor]  # (W, A, G, grad), W out x in


@dataclass
class SCPScores:
    """Per-channel scores of an MLP's intermediate channels.

    Attributes:
        hess: raw Hessian term, summed over the channel's projections (>= 0).
        first: raw first-order term, summed over the channel's projections.
        gcs: ``hess / scale_hess - lam * first / scale_first``.
        hess_parts: raw Hessian term per projection, in-projections in the given order, then down.
        first_parts: raw first-order term per projection, same order.
        scale_hess, scale_first: mean absolute values over the channels (1.0 if zero).
        robust_scale_hess, robust_scale_first: median absolute values (diagnostics).
        lam: the lambda used for ``gcs``.
    """

    hess: Tensor
    first: Tensor
    gcs: Tensor
    hess_parts: list[Tensor]
    first_parts: list[Tensor]
    scale_hess: float
    scale_first: float
    robust_scale_hess: float
    robust_scale_first: float
    lam: float


def _checked_projection(which: str, W: Tensor, A: Tensor, G: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    """``(W, A, G, grad)`` in float32, their shapes checked against ``W`` (``which``: in or down)."""
    W, A, G, grad = _f32(W), _f32(A), _f32(G), _f32(grad)
    n_out, n_in = W.shape
    _check_square(f"A_{which}", A, n_in)
    _check_square(f"G_{which}", G, n_out)
    if grad.shape != W.shape:
        raise ValueError(f"grad_{which} must have W_{which}'s shape {tuple(W.shape)}, got {tuple(grad.shape)}")
    return W, A, G, grad


def _in_proj_terms(W: Tensor, A: Tensor, G: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Terms for zeroing row ``c`` of an in-projection: ``Delta = -e_c w_c^T``."""
    W, A, G, grad = _checked_projection("in", W, A, G, grad)
    # ||G[:, c]||_1 * ||A w_c||_1; column c of A @ W^T is A w_c.
    hess = G.abs().sum(dim=0) * (A @ W.T).abs().sum(dim=0)
    return hess, -(grad * W).sum(dim=1)


def _down_proj_terms(W: Tensor, A: Tensor, G: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Terms for zeroing column ``c`` of the down projection: ``Delta = -d_c e_c^T``."""
    W, A, G, grad = _checked_projection("down", W, A, G, grad)
    # ||G d_c||_1 * ||A[c, :]||_1; column c of G @ W is G d_c.
    hess = (G @ W).abs().sum(dim=0) * A.abs().sum(dim=1)
    return hess, -(grad * W).sum(dim=0)


def scp_scores(ins: Sequence[Projection], out: Projection, lam: float) -> SCPScores:
    """Score every intermediate channel of an MLP for removal.

    Channel ``c`` is row ``c`` of each in-projection (up, and gate where present) and column ``c``
    of the down projection. An in-projection with ``m * I`` rows stacks ``m`` blocks (phi3's fused
    gate/up): rows ``c``, ``I + c``, ... are all channel ``c``'s, each scored with the whole ``G``. Per projection (``W`` out x in, factors ``A``, ``G``, gradient ``grad``):

    * in-projection row ``w_c``:  ``hess = ||G_in[:, c]||_1 * ||A_in w_c||_1``,
      ``first = -<grad_in[c, :], w_c>``;
    * down column ``d_c``:        ``hess = ||G_down d_c||_1 * ||A_down[c, :]||_1``,
      ``first = -<grad_down[:, c], d_c>``.

    A channel's raw terms are the sums over its projections; the sums are normalised by their mean
    absolute value over the channels and combined as ``gcs = hess_n - lam * first_n``.

    Args:
        ins: ``[(W_in, A_in, G_in, grad_in), ...]`` for each in-projection (``W_in``: I x H).
        out: ``(W_down, A_down, G_down, grad_down)`` (``W_down``: H x I).
        lam: weight of the first-order term.
    """
    if len(ins) == 0:
        raise ValueError("scp_scores needs at least one in-projection")
    n_ch = out[0].shape[1]
    hess_parts: list[Tensor] = []
    first_parts: list[Tensor] = []
    for k, proj in enumerate(ins):
        if proj[0].shape[0] % n_ch:
            raise ValueError(f"in-projection {k} has {proj[0].shape[0]} rows, down has {n_ch} columns")
        h, f = _in_proj_terms(*proj)
        hess_parts += list(h.view(-1, n_ch))  # one part per stacked block (fused gate/up: two)
        first_parts += list(f.view(-1, n_ch))
    h, f = _down_proj_terms(*out)
    hess_parts.append(h)
    first_parts.append(f)

    hess = torch.stack(hess_parts).sum(dim=0)
    first = torch.stack(first_parts).sum(dim=0)
    scales = _scales(hess, first)
    gcs = _gcs(hess, first, scales["scale_hess"], scales["scale_first"], lam)
    return SCPScores(hess=hess, first=first, gcs=gcs, hess_parts=hess_parts, first_parts=first_parts, lam=float(lam),
                     **scales)


# --------------------------------------------------------------------------------------------
# SCP baselines (no curvature)
# --------------------------------------------------------------------------------------------


def _as_list(ins_W: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [ins_W] if isinstance(ins_W, Tensor) else list(ins_W)


def magnitude_channel_scores(ins_W: Tensor | Sequence[Tensor], down_W: Tensor) -> Tensor:
    """Weight-norm baseline: the L2 norm of all of channel ``c``'s weights.

    ``score_c = sqrt(sum_k ||W_in_k[c, :]||^2 + ||W_down[:, c]||^2)``. (A strawman: it did worse than
    random channels on the default model; docs/method.md, section 5.)
    """
    sq = _f32(down_W).pow(2).sum(dim=0)
    for W in _as_list(ins_W):
        if W.shape[0] % sq.numel():
            raise ValueError(f"in-projection has {W.shape[0]} rows, down has {sq.numel()} columns")
        sq = sq + _f32(W).pow(2).sum(dim=1).view(-1, sq.numel()).sum(dim=0)  # stacked blocks: a channel's rows
    return sq.sqrt()


def wanda_channel_scores(
    ins_W: Tensor | Sequence[Tensor],
    down_W: Tensor,
    act: Tensor,
    *,
    include_in: bool = False,
) -> Tensor:
    """Activation-aware (Wanda-style) baseline: channel weight norm x input activation norm.

    The input activation of channel ``c`` is the down projection's input ``h_c``; its norm is
    ``sqrt(E[h_c^2]) = sqrt(A_down[c, c])``.

    By default the weight norm is the down column's, ``||W_down[:, c]||_2``, so that
    ``score_c = ||W_down[:, c]||_2 * sqrt(A_down[c, c])`` is exactly the RMS size of the channel's
    contribution ``d_c h_c`` to the MLP output (Wanda's ``|W| * ||X||`` on the down projection,
    aggregated over the column). With ``include_in=True`` the weight norm also covers the channel's
    in-projection rows (``magnitude_channel_scores``).

    Args:
        ins_W: in-projection weights (I x H each); only used when ``include_in``.
        down_W: down-projection weight (H x I).
        act: ``A_down`` (I x I; its diagonal is used) or per-channel RMS activations (I,).
    """
    act = _f32(act)
    norms = act.diagonal().clamp_min(0).sqrt() if act.dim() == 2 else act
    if norms.shape != (down_W.shape[1],):
        raise ValueError(f"activation norms must have {down_W.shape[1]} entries, got {tuple(norms.shape)}")
    w = magnitude_channel_scores(ins_W, down_W) if include_in else _f32(down_W).norm(dim=0)
    return w * norms
