"""Closed-form GCS scores against brute-force evaluation of ||G Delta A||_1 and <grad, Delta>."""

from __future__ import annotations

import math

import pytest
import torch

from gradot.methods.gradot.scores import (
    drd_scores,
    drd_select,
    magnitude_channel_scores,
    scp_scores,
    svd_select,
    wanda_channel_scores,
)


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    M = torch.randn(n, n, generator=gen)
    return M @ M.T / n + 0.1 * torch.eye(n)


def _bf_terms(W, A, G, grad, Delta):
    """Brute force in float64: (||G Delta A||_1, <grad, Delta>)."""
    d = lambda t: t.double()  # noqa: E731
    return (d(G) @ d(Delta) @ d(A)).abs().sum().item(), (d(grad) * d(Delta)).sum().item()


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_drd_scores_match_brute_force(shape):
    gen = torch.Generator().manual_seed(0)
    n_out, n_in = shape
    W = torch.randn(n_out, n_in, generator=gen)
    A, G = _spd(n_in, gen), _spd(n_out, gen)
    grad = torch.randn(n_out, n_in, generator=gen)
    lam = 0.3
    sc = drd_scores(W, A, G, grad, lam)

    r = min(shape)
    assert sc.U.shape == (n_out, r) and sc.S.shape == (r,) and sc.Vh.shape == (r, n_in)
    assert sc.U.dtype == sc.S.dtype == sc.Vh.dtype == torch.float32
    torch.testing.assert_close(sc.U @ torch.diag(sc.S) @ sc.Vh, W, rtol=1e-5, atol=1e-5)

    for j in range(r):
        Delta = -sc.S[j] * torch.outer(sc.U[:, j], sc.Vh[j])
        hess_bf, first_bf = _bf_terms(W, A, G, grad, Delta)
        assert sc.hess[j].item() == pytest.approx(hess_bf, rel=1e-4)
        assert sc.first[j].item() == pytest.approx(first_bf, rel=1e-4, abs=1e-5)

    # normalisation: mean |term| / scale == 1, and gcs combines the normalised terms
    assert (sc.hess / sc.scale_hess).abs().mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (sc.first / sc.scale_first).abs().mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(sc.gcs, sc.hess / sc.scale_hess - lam * sc.first / sc.scale_first)
    assert sc.robust_scale_hess == pytest.approx(sc.hess.abs().median().item())
    assert sc.robust_scale_first == pytest.approx(sc.first.abs().median().item())
    assert sc.lam == lam


def test_drd_zero_gradient_guard():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(6, 5, generator=gen)
    sc = drd_scores(W, _spd(5, gen), _spd(6, gen), torch.zeros(6, 5), lam=1.0)
    assert sc.scale_first == 1.0
    assert torch.isfinite(sc.gcs).all()
    torch.testing.assert_close(sc.gcs, sc.hess / sc.scale_hess)


def test_drd_scores_accept_low_precision_inputs():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(7, 5, generator=gen)
    A, G, grad = _spd(5, gen), _spd(7, gen), torch.randn(7, 5, generator=gen)
    ref = drd_scores(W, A, G, grad, 0.1)
    half = drd_scores(W.bfloat16(), A, G, grad, 0.1)
    assert half.S.dtype == torch.float32
    torch.testing.assert_close(half.S, ref.S, rtol=2e-2, atol=2e-2)


def test_drd_select_keeps_top_singular_values_even_with_lowest_gcs():
    n = 40  # ceil(0.05 * 40) = 2 protected components
    S = torch.linspace(10, 1, n)
    gcs = torch.arange(n, dtype=torch.float32)  # top singular values have the LOWEST gcs
    keep = drd_select(S, gcs, rank=10)
    assert keep.dtype == torch.long and keep.numel() == 10
    assert keep.tolist() == sorted(keep.tolist())
    assert {0, 1} <= set(keep.tolist())
    assert set(keep.tolist()) - {0, 1} == set(range(n - 8, n))  # the 8 highest-GCS others

    # rank below the protected count: only the largest singular values
    assert drd_select(S, gcs, rank=1).tolist() == [0]
    # rank above the size is capped; rank 0 keeps nothing
    assert drd_select(S, gcs, rank=100).tolist() == list(range(n))
    assert drd_select(S, gcs, rank=0).numel() == 0
    # top_frac = 0: pure GCS selection
    assert drd_select(S, gcs, rank=3, top_frac=0.0).tolist() == [37, 38, 39]


def test_drd_select_top_count_is_exact_ceil():
    n = 60  # 0.05 * 60 = 3.0000000000000004 in floating point: must still protect 3, not 4
    S = torch.linspace(10, 1, n)
    gcs = torch.arange(n, dtype=torch.float32)
    keep = drd_select(S, gcs, rank=5).tolist()
    assert keep == [0, 1, 2, 58, 59]
    # S need not be sorted
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    keep_p = drd_select(S[perm], gcs[perm], rank=5)
    assert sorted(perm[keep_p].tolist()) == keep


def test_drd_select_handles_nan_scores():
    S = torch.linspace(5, 1, 21)  # ceil(0.05 * 21) = 2 protected
    gcs = torch.full((21,), float("nan"))
    gcs[10] = 3.0
    keep = drd_select(S, gcs, rank=4)
    assert keep.numel() == 4 and len(set(keep.tolist())) == 4
    assert {0, 1, 10} <= set(keep.tolist())


def test_svd_select():
    S = torch.tensor([3.0, 5.0, 1.0, 4.0])
    assert svd_select(S, 2).tolist() == [1, 3]
    assert svd_select(S, 10).tolist() == [0, 1, 2, 3]


def _mlp(gen, I=10, H=6, gated=True):
    def proj(n_out, n_in):
        return (
            torch.randn(n_out, n_in, generator=gen),
            _spd(n_in, gen),
            _spd(n_out, gen),
            torch.randn(n_out, n_in, generator=gen),
        )

    up = proj(I, H)
    ins = [up]
    if gated:  # gate reads the same input as up: same A, its own G
        g = proj(I, H)
        ins.append((g[0], up[1], g[2], g[3]))
    return ins, proj(H, I)


@pytest.mark.parametrize("gated", [True, False])
def test_scp_scores_match_brute_force(gated):
    gen = torch.Generator().manual_seed(3)
    ins, out = _mlp(gen, gated=gated)
    n_ch = out[0].shape[1]
    lam = 0.7
    sc = scp_scores(ins, out, lam)
    assert sc.hess.shape == sc.first.shape == sc.gcs.shape == (n_ch,)
    assert len(sc.hess_parts) == len(ins) + 1

    for c in range(n_ch):
        hess_c = first_c = 0.0
        for k, (W, A, G, grad) in enumerate(ins):
            Delta = torch.zeros_like(W)
            Delta[c] = -W[c]  # zero row c
            h, f = _bf_terms(W, A, G, grad, Delta)
            assert sc.hess_parts[k][c].item() == pytest.approx(h, rel=1e-4)
            assert sc.first_parts[k][c].item() == pytest.approx(f, rel=1e-4, abs=1e-5)
            hess_c, first_c = hess_c + h, first_c + f
        W, A, G, grad = out
        Delta = torch.zeros_like(W)
        Delta[:, c] = -W[:, c]  # zero column c
        h, f = _bf_terms(W, A, G, grad, Delta)
        assert sc.hess_parts[-1][c].item() == pytest.approx(h, rel=1e-4)
        assert sc.first_parts[-1][c].item() == pytest.approx(f, rel=1e-4, abs=1e-5)
        assert sc.hess[c].item() == pytest.approx(hess_c + h, rel=1e-4)
        assert sc.first[c].item() == pytest.approx(first_c + f, rel=1e-4, abs=1e-5)

    assert (sc.hess / sc.scale_hess).abs().mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (sc.first / sc.scale_first).abs().mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(sc.gcs, sc.hess / sc.scale_hess - lam * sc.first / sc.scale_first)
    assert sc.robust_scale_hess == pytest.approx(sc.hess.abs().median().item())
    assert sc.robust_scale_first == pytest.approx(sc.first.abs().median().item())


def test_scp_shape_mismatch_raises():
    gen = torch.Generator().manual_seed(4)
    ins, out = _mlp(gen, I=10)
    bad = (ins[0][0][:9], ins[0][1], ins[0][2][:9, :9], ins[0][3][:9])
    with pytest.raises(ValueError):
        scp_scores([bad], out, 0.0)


def test_magnitude_and_wanda_channel_scores():
    gen = torch.Generator().manual_seed(5)
    ins, out = _mlp(gen)
    ins_W = [p[0] for p in ins]
    down_W, A_down = out[0], out[1]
    mag = magnitude_channel_scores(ins_W, down_W)
    for c in range(down_W.shape[1]):
        flat = torch.cat([W[c] for W in ins_W] + [down_W[:, c]])
        assert mag[c].item() == pytest.approx(flat.norm().item(), rel=1e-5)
        act = math.sqrt(A_down[c, c].item())
        w = wanda_channel_scores(ins_W, down_W, A_down)
        assert w[c].item() == pytest.approx(down_W[:, c].norm().item() * act, rel=1e-5)
        w_in = wanda_channel_scores(ins_W, down_W, A_down, include_in=True)
        assert w_in[c].item() == pytest.approx(flat.norm().item() * act, rel=1e-5)
    # activation norms may be given directly
    norms = A_down.diagonal().sqrt()
    torch.testing.assert_close(wanda_channel_scores(ins_W, down_W, norms), wanda_channel_scores(ins_W, down_W, A_down))
    # a single in-projection may be passed as a tensor
    torch.testing.assert_close(magnitude_channel_scores(ins_W[0], down_W), magnitude_channel_scores(ins_W[:1], down_W))
