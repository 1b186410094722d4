"""KFAC statistics against a brute-force computation with per-token autograd on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from gradot.stats.kfac import KFACFactors, collect_kfac, damped, forward_backward_floor

PAD = 0


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def _llama_modules(model, layers=(0, 1), parts=("q", "k", "v", "o", "gate", "up", "down")):
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    return {
        f"model.layers.{i}.{names[p]}": model.get_submodule(f"model.layers.{i}.{names[p]}")
        for i in layers
        for p in parts
    }


def _gpt2_modules(model):
    return {
        f"transformer.h.{i}.{n}": model.get_submodule(f"transformer.h.{i}.{n}")
        for i in range(2)
        for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def _batches():
    gen = torch.Generator().manual_seed(1)
    ids1 = torch.randint(1, 100, (2, 7), generator=gen)
    mask1 = torch.ones_like(ids1)
    mask1[1, 5:] = 0  # right padding
    ids1[1, 5:] = PAD
    ids2 = torch.randint(1, 100, (3, 5), generator=gen)
    mask2 = torch.ones_like(ids2)
    mask2[0, :2] = 0  # left padding
    ids2[0, :2] = PAD
    ids3 = torch.randint(1, 100, (1, 6), generator=gen)  # a plain LongTensor batch: no padding
    return [{"input_ids": ids1, "attention_mask": mask1}, {"input_ids": ids2, "attention_mask": mask2}, ids3]


def _brute_force(model, modules, batches, samples=None):
    """Reference statistics with explicit inputs, per-token autograd and parameter gradients.

    g_t (per position) = sum over loss tokens s of d l_s / d y_t, computed one token loss at a time.
    ``samples``: per batch, a flat boolean mask of the positions that enter ``A`` and ``G`` (default:
    every non-padding position); ``grad`` always sums over every loss token.
    """
    model.eval()
    names = list(modules)
    sums = {n: {"A": 0.0, "G": 0.0, "gx": 0.0, "W": 0.0, "n": 0} for n in names}
    n_loss_total = 0
    for b, batch in enumerate(batches):
        if isinstance(batch, torch.Tensor):
            ids, mask = batch, torch.ones_like(batch)
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # padding predicts nothing
        store = {}
        hooks = [
            m.register_forward_hook(lambda mod, inp, out, n=n: store.__setitem__(n, (inp[0], out)))
            for n, m in modules.items()
        ]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for h in hooks:
            h.remove()
        tok_loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
        )
        loss_idx = (labels[:, 1:].reshape(-1) != -100).nonzero().squeeze(1)
        n_loss_total += loss_idx.numel()
        ys = [store[n][1] for n in names]
        g = [torch.zeros_like(y) for y in ys]
        for t in loss_idx.tolist():  # one autograd call per token loss
            for acc, gt in zip(g, torch.autograd.grad(tok_loss[t], ys, retain_graph=True)):
                acc += gt
        weights = [modules[n].weight for n in names]
        wgrads = torch.autograd.grad(tok_loss.sum(), weights)
        real = mask.reshape(-1).bool()
        keep = real if samples is None else samples[b]
        for n, gi, wg in zip(names, g, wgrads):
            x_all = store[n][0].detach().reshape(-1, store[n][0].shape[-1]).double()
            g_all = gi.reshape(-1, gi.shape[-1]).double()
            x, gg = x_all[keep], g_all[keep]
            s = sums[n]
            s["A"] = s["A"] + x.T @ x
            s["G"] = s["G"] + gg.T @ gg
            s["gx"] = s["gx"] + g_all[real].T @ x_all[real]
            s["W"] = s["W"] + (wg.T if isinstance(modules[n], Conv1D) else wg).double()  # out x in
            s["n"] += x.shape[0]
    ref = {}
    for n in names:
        s = sums[n]
        ref[n] = {
            "A": s["A"] / s["n"],
            "G": s["G"] / s["n"],
            "grad": s["W"] / n_loss_total,  # autograd gradient of the mean loss
            "gx": s["gx"] / n_loss_total,  # the same from per-token gradients and inputs
            "n": s["n"],
        }
    return ref, n_loss_total


def _assert_matches(fac: dict[str, KFACFactors], ref, n_loss):
    for n, r in ref.items():
        f = fac[n]
        assert f.A.dtype == f.G.dtype == f.grad.dtype == torch.float32
        assert f.n_tokens == r["n"] and f.n_loss_tokens == n_loss
        _close(r["gx"], r["grad"])  # the convention itself: grad of the mean loss == sum_t g_t x_t^T / N
        _close(f.A, r["A"])
        _close(f.G, r["G"])
        _close(f.grad, r["grad"])


def _close(actual, expected, rel=1e-4):
    """Elementwise closeness with an absolute floor relative to the matrix's largest entry."""
    expected = expected.double()
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * expected.abs().max().item())


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.mark.parametrize(
    "select",
    [
        {},  # every linear of both layers
        {"layers": (1,), "parts": ("gate", "up", "down")},  # only an upper MLP: backward stops there
    ],
)
def test_llama_matches_brute_force(llama, select):
    modules = _llama_modules(llama, **select)
    batches = _batches()
    ref, n_loss = _brute_force(llama, modules, batches)
    fac = collect_kfac(llama, modules, batches, progress=False)
    assert set(fac) == set(modules)
    _assert_matches(fac, ref, n_loss)
    # 2*7-2 + 3*5-2 + 6 non-padding positions; loss tokens exclude each sequence's first real token
    assert fac[next(iter(modules))].n_tokens == 12 + 13 + 6
    assert n_loss == 31 - 6
    for f in fac.values():  # an input-gradient-free check that nothing leaked onto padding
        assert torch.isfinite(f.G).all() and f.G.diagonal().min() >= 0


def test_model_state_restored_and_no_param_grads(llama):
    llama.train()
    llama.model.layers[0].mlp.requires_grad_(False)
    try:
        collect_kfac(llama, _llama_modules(llama), _batches()[:1], progress=False)
        assert all(p.grad is None for p in llama.parameters())
        assert llama.training and all(m.training for m in llama.modules())
        assert not any(p.requires_grad for p in llama.model.layers[0].mlp.parameters())
        assert all(p.requires_grad for p in llama.model.layers[1].parameters())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in llama.modules())
    finally:
        llama.eval()
        llama.requires_grad_(True)


def test_shared_inputs_share_A(llama):
    modules = _llama_modules(llama)
    batches = _batches()
    fac = collect_kfac(llama, modules, batches, progress=False)
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v, o = (fac[p + f"self_attn.{x}_proj"] for x in "qkvo")
        gate, up, down = (fac[p + f"mlp.{x}_proj"] for x in ("gate", "up", "down"))
        assert q.A is k.A and k.A is v.A
        assert gate.A is up.A
        assert o.A is not q.A and down.A is not gate.A
        assert q.G.shape == (32, 32) and k.G.shape == (16, 16) and k.grad.shape == (16, 32)
    unshared = collect_kfac(llama, modules, batches, progress=False, shared_inputs=False)
    q0, k0 = unshared["model.layers.0.self_attn.q_proj"], unshared["model.layers.0.self_attn.k_proj"]
    assert q0.A is not k0.A
    for n in modules:
        torch.testing.assert_close(unshared[n].A, fac[n].A)
        torch.testing.assert_close(unshared[n].G, fac[n].G)


def test_gpt2_conv1d_out_in_convention():
    model = _gpt2()
    modules = _gpt2_modules(model)
    assert all(isinstance(m, Conv1D) for m in modules.values())
    batches = _batches()
    ref, n_loss = _brute_force(model, modules, batches)
    fac = collect_kfac(model, modules, batches, progress=False)
    c_attn = fac["transformer.h.0.attn.c_attn"]
    assert c_attn.A.shape == (32, 32) and c_attn.G.shape == (96, 96) and c_attn.grad.shape == (96, 32)
    assert fac["transformer.h.0.mlp.c_fc"].grad.shape == (128, 32)
    assert fac["transformer.h.0.mlp.c_proj"].grad.shape == (32, 128)
    _assert_matches(fac, ref, n_loss)


@pytest.mark.parametrize("preset", [None, True, False])
def test_gradient_checkpointing_gives_same_factors(llama, preset):
    """preset None: collect_kfac enables checkpointing itself; True/False: the caller already enabled
    it with use_reentrant=preset, and collect_kfac uses that setting as is."""
    modules = _llama_modules(llama)
    batches = _batches()
    plain = collect_kfac(llama, modules, batches, progress=False)
    if preset is not None:
        kwargs = {"use_reentrant": preset}
        if hasattr(llama, "activation_checkpointing_enable"):  # transformers >= 5
            llama.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        calls = {"n": 0}
        # count forward calls of one tracked linear: > 1 per batch proves recomputation happened
        h = modules["model.layers.0.self_attn.q_proj"].register_forward_hook(
            lambda *a: calls.__setitem__("n", calls["n"] + 1)
        )
        ckpt = collect_kfac(llama, modules, batches, progress=False, gradient_checkpointing=True)
        h.remove()
        assert calls["n"] == 2 * len(batches)
        for n in modules:
            for field in ("A", "G", "grad"):
                torch.testing.assert_close(getattr(ckpt[n], field), getattr(plain[n], field), rtol=1e-5, atol=1e-7)
            assert ckpt[n].n_tokens == plain[n].n_tokens
        assert ckpt["model.layers.0.self_attn.q_proj"].A is ckpt["model.layers.0.self_attn.v_proj"].A
        still_on = any(getattr(m, "gradient_checkpointing", False) for m in llama.modules())
        assert still_on == (preset is not None)  # collect_kfac leaves the caller's setting alone
        assert all(p.grad is None for p in llama.parameters())
    finally:
        if any(getattr(m, "gradient_checkpointing", False) for m in llama.modules()):
            getattr(llama, "activation_checkpointing_disable", llama.gradient_checkpointing_disable)()
        if hasattr(llama, "disable_input_require_grads"):
            llama.disable_input_require_grads()
        llama.eval()


def test_gpt2_gradient_checkpointing():
    model = _gpt2()
    modules = _gpt2_modules(model)
    batches = _batches()
    plain = collect_kfac(model, modules, batches, progress=False)
    ckpt = collect_kfac(model, modules, batches, progress=False, gradient_checkpointing=True)
    for n in modules:
        torch.testing.assert_close(ckpt[n].G, plain[n].G, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ckpt[n].grad, plain[n].grad, rtol=1e-5, atol=1e-7)


def test_rejects_non_linear_modules(llama):
    with pytest.raises(TypeError):
        collect_kfac(llama, {"emb": llama.model.embed_tokens}, _batches(), progress=False)


def test_forward_backward_floor(llama):
    secs = forward_backward_floor(llama, _batches())
    assert isinstance(secs, float) and secs > 0
    assert all(p.grad is None for p in llama.parameters())
    assert all(p.requires_grad for p in llama.parameters())


def test_bfloat16_products_close_to_float32(llama):
    """Products from bfloat16 copies, summed in float32: the factors stay float32, symmetric, and
    within bfloat16's rounding of the exact ones; ``grad`` is unchanged."""
    modules = _llama_modules(llama)
    batches = _batches()
    exact = collect_kfac(llama, modules, batches, progress=False)
    low = collect_kfac(llama, modules, batches, progress=False, products=torch.bfloat16)
    for name, f in exact.items():
        g = low[name]
        for a, b in ((f.A, g.A), (f.G, g.G)):
            assert b.dtype == torch.float32 and torch.equal(b, b.T)
            rel = (a - b).norm() / a.norm()
            assert 0 < rel < 2e-2, (name, float(rel))  # rounded, but only by bfloat16's 8 bits
        torch.testing.assert_close(g.grad, f.grad)
    with pytest.raises(ValueError, match="products"):
        collect_kfac(llama, modules, batches, progress=False, products=torch.int8)


def _token_sample(batches, fraction, seed=0):
    """The documented sample: per batch, the first ``round(fraction * n)`` (at least one) of a random
    permutation of the ``n`` non-padding positions, from one CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
        mask = torch.ones_like(ids) if isinstance(batch, torch.Tensor) else batch["attention_mask"]
        real = mask.reshape(-1).bool().nonzero().squeeze(1)
        k = max(1, round(fraction * real.numel()))
        sample = torch.zeros(ids.numel(), dtype=torch.bool)
        sample[real[torch.randperm(real.numel(), generator=gen)[:k]]] = True
        out.append(sample)
    return out


@pytest.mark.parametrize("fraction", [0.5, 0.2])
def test_token_fraction_averages_the_sample(llama, fraction):
    """``token_fraction < 1``: ``A`` and ``G`` are exact averages over the seeded token sample (never a
    padding position), ``grad`` still over every loss token; another seed draws another sample."""
    modules = _llama_modules(llama)
    batches = _batches()
    samples = _token_sample(batches, fraction)
    ref, n_loss = _brute_force(llama, modules, batches, samples=samples)
    fac = collect_kfac(llama, modules, batches, progress=False, token_fraction=fraction)
    _assert_matches(fac, ref, n_loss)
    assert fac[next(iter(modules))].n_tokens == sum(int(s.sum()) for s in samples) < 31
    other = collect_kfac(llama, modules, batches, progress=False, token_fraction=fraction, seed=1)
    name = next(iter(modules))
    assert not torch.equal(other[name].A, fac[name].A)
    torch.testing.assert_close(other[name].grad, fac[name].grad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="token_fraction"):
            collect_kfac(llama, modules, batches, progress=False, token_fraction=bad)


def test_damped_adds_delta_times_mean_eigenvalue_and_keeps_sharing(llama):
    fac = collect_kfac(llama, _llama_modules(llama), _batches(), progress=False)
    before = {n: (f.A.clone(), f.G.clone()) for n, f in fac.items()}
    out = damped(fac, 0.5)
    for n, f in out.items():
        A, G = before[n]
        torch.testing.assert_close(f.A, A + 0.5 * A.diagonal().mean() * torch.eye(A.shape[0]))
        torch.testing.assert_close(f.G, G + 0.5 * G.diagonal().mean() * torch.eye(G.shape[0]))
        assert f.grad is fac[n].grad and f.n_tokens == fac[n].n_tokens
        torch.testing.assert_close(fac[n].A, A, rtol=0, atol=0)  # the inputs are untouched
    p = "model.layers.0."
    assert out[p + "self_attn.q_proj"].A is out[p + "self_attn.k_proj"].A  # shared stays shared
    assert out[p + "mlp.gate_proj"].A is out[p + "mlp.up_proj"].A
    assert all(damped(fac, 0.0)[n] is fac[n] for n in fac)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            damped(fac, bad)
