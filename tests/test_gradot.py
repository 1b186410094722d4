"""GradOT emulators: exactness at full budget, budget accuracy, selection rules, artifacts."""

import math

import pytest
import torch
from conftest import ARCHS, VOCAB, calib_batches, tiny_model

from gradot.artifacts import load_emulator, save_emulator
from gradot.emulator import middle_parameter_count
from gradot.methods.gradot import ALLOCATIONS, GradOTConfig, gradot_emulator, middle_linears, score_middle
from gradot.stats.kfac import collect_kfac
from gradot.registry import arch_of, decoder_layers, get_module, linear_shape, set_module, weight_out_in
from gradot.methods.gradot.scores import drd_select
from gradot.split import split_model
from gradot.surgery import LowRankLinear, prune_mlp_channels, to_lowrank


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def factors_for(model, split):
    return collect_kfac(model, middle_linears(model, split), calib_batches(), progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_drd_and_keep_all_scp_leave_logits_unchanged(arch, tokens):
    model = tiny_model(arch)
    spec = arch_of(model)
    reference = logits(model, tokens)
    layer = decoder_layers(model)[2]
    for name in spec.attn_linears:
        module = get_module(layer, name)
        W = weight_out_in(module, spec).detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        set_module(layer, name, to_lowrank(module, spec, U, S, Vh, torch.arange(len(S))))
        assert isinstance(get_module(layer, name), LowRankLinear)
    channels = linear_shape(get_module(layer, spec.mlp_out), spec)[1]
    prune_mlp_channels(layer, spec, torch.arange(channels).flip(0))  # order must not matter
    assert torch.allclose(logits(model, tokens), reference, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_keep_one_is_exact(arch, allocation, tokens):
    model = tiny_model(arch)
    split = split_model(model, 2)
    emu = gradot_emulator(model, split, GradOTConfig(keep=1.0, allocation=allocation, lambda_attn=0.1), factors_for(model, split))
    assert torch.equal(logits(model, tokens), logits(emu.model, tokens))


def wide_model():
    from transformers import LlamaConfig
    from gradot.modeling import random_model
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2)
    return random_model(cfg, seed=3)


@pytest.mark.parametrize("allocation", ALLOCATIONS)
@pytest.mark.parametrize("keep", [0.4, 0.7])
def test_achieved_size_matches_budget_within_one_percent(allocation, keep):
    model = wide_model()
    split = split_model(model, 2)
    emu = gradot_emulator(model, split, GradOTConfig(keep=keep, allocation=allocation), factors_for(model, split))
    size = emu.manifest["size"]
    assert size["middle_params_original"] == middle_parameter_count(model, split)
    assert abs(size["keep_achieved"] - keep) <= 0.01 * keep
    assert size["keep_achieved"] <= keep + 1e-9  # never over budget
    # The manifest's count is what the emulator really stores.
    layers = decoder_layers(emu.model)
    stored = sum(p.numel() for i, s in enumerate(emu.manifest["slots"]) if s["role"] == "middle" for p in layers[i].parameters())
    assert stored == size["middle_params_kept"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("keep", [0.4, 0.6])
def test_dropping_whole_layers_never_undershoots_the_budget(arch, keep):
    # A layer drop that lands far below the target (with nothing left to give back) is skipped.
    model = tiny_model(arch, layers=8)
    split = split_model(model, 2)
    emu = gradot_emulator(model, split, GradOTConfig(keep=keep, allocation="global-layers"), factors_for(model, split))
    assert abs(emu.manifest["size"]["keep_achieved"] - keep) <= 0.01 * keep


def test_layer_cost_normalises_the_mlp_first_order_term_like_the_channels():
    model = tiny_model("opt", layers=8)
    split = split_model(model, 2)
    f = factors_for(model, split)
    for ls in score_middle(model, split, f, GradOTConfig(keep=0.5, allocation="global-layers", lambda_mlp=1.0)):
        attn, mlp = ls.removal
        assert mlp.ratio == pytest.approx(ls.mlp.scp.scale_hess / ls.mlp.scp.scale_first)
        assert ls.cost == pytest.approx(attn.hess + mlp.hess - mlp.first * mlp.ratio)


@pytest.mark.parametrize("selection", ["svd", "wanda"])
def test_ablations_hit_the_budget(selection):
    model = wide_model()
    split = split_model(model, 2)
    f = factors_for(model, split) if selection == "wanda" else None
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.5, selection=selection), f, method=selection)
    assert abs(emu.manifest["size"]["keep_achieved"] - 0.5) <= 0.005


def test_selection_keeps_top_five_percent_and_follows_gcs():
    model = wide_model()
    split = split_model(model, 2)
    scores = score_middle(model, split, factors_for(model, split), GradOTConfig(keep=0.4, lambda_attn=0.3))
    for ls in scores:
        for m in ls.attn:
            n = len(m.svd.S)
            top = math.ceil(0.05 * n)
            for rank in (top, n // 3, n // 2):
                kept = set(m.keep_order[:rank].tolist())
                assert set(range(top)) <= kept  # the largest singular values survive
                assert kept == set(drd_select(m.svd.S, m.svd.gcs, rank).tolist())


def test_global_allocation_differs_per_layer_and_can_drop_layers():
    model = wide_model()
    split = split_model(model, 2)
    f = factors_for(model, split)
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.4, allocation="global"), f)
    middle = [s for s in emu.manifest["slots"] if s["role"] == "middle"]
    assert len({s["channels"] for s in middle}) > 1 or len({tuple(s["ranks"].items()) for s in middle}) > 1
    # A layer whose removal costs nothing goes first: zero one layer's output projections.
    layers = decoder_layers(model)
    with torch.no_grad():
        layers[3].self_attn.o_proj.weight.zero_()
        layers[3].mlp.down_proj.weight.zero_()
    f = factors_for(model, split)
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.7, allocation="global-layers"), f)
    assert 3 in emu.manifest["settings"]["dropped_layers"]
    assert abs(emu.manifest["size"]["keep_achieved"] - 0.7) <= 0.007  # units elsewhere fill the rest
    # At keep 0.8 a quarter of the middle block cannot go: the budget wins over the free layer.
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.8, allocation="global-layers"), f)
    assert emu.manifest["settings"]["dropped_layers"] == []
    assert abs(emu.manifest["size"]["keep_achieved"] - 0.8) <= 0.008


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("allocation", ["uniform", "global-layers"])
def test_gradot_emulator_save_load_roundtrip(arch, allocation, tokens, tmp_path):
    model = tiny_model(arch, layers=8)
    split = split_model(model, 2)
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.5, allocation=allocation, lambda_mlp=0.01), factors_for(model, split))
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert torch.equal(logits(emu.model, tokens), logits(loaded.model, tokens))
    assert not torch.allclose(logits(model, tokens), logits(emu.model, tokens))


@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_rescore_to_another_lambda_equals_scoring_at_it(allocation):
    from gradot.methods.gradot import rescore

    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    f = factors_for(model, split)
    base = score_middle(model, split, f, GradOTConfig(keep=0.5, allocation=allocation))
    for lam_attn, lam_mlp in ((0.3, 0.0), (1.0, 2.0)):
        cfg = GradOTConfig(keep=0.5, allocation=allocation, lambda_attn=lam_attn, lambda_mlp=lam_mlp)
        direct, again = score_middle(model, split, f, cfg), rescore(base, cfg)
        for d, r in zip(direct, again):
            assert math.isclose(d.cost, r.cost, rel_tol=1e-5) or d.cost == r.cost == math.inf
            torch.testing.assert_close(d.mlp.cost, r.mlp.cost)
            assert torch.equal(d.mlp.keep_order, r.mlp.keep_order)
            for dm, rm in zip(d.attn, r.attn):
                torch.testing.assert_close(dm.cost, rm.cost)
                assert torch.equal(dm.keep_order, rm.keep_order) and dm.protected == rm.protected
        # The same emulator either way (the λ sweep of --auto-lambda relies on it).
        x = torch.randint(0, VOCAB, (1, 12))
        a = gradot_emulator(model, split, cfg, None, scores=direct)
        b = gradot_emulator(model, split, cfg, None, scores=again)
        assert a.manifest["slots"] == b.manifest["slots"]
        torch.testing.assert_close(logits(a.model, x), logits(b.model, x))
    without_grad = collect_kfac(model, middle_linears(model, split), calib_batches(), progress=False, gradients=False)
    plain = score_middle(model, split, without_grad, GradOTConfig(keep=0.5))
    with pytest.raises(ValueError, match="gradients=True"):
        rescore(plain, GradOTConfig(keep=0.5, lambda_mlp=0.1))


def test_auto_lambda_picks_the_largest_lambda_that_keeps_the_proxy(tokens):
    from gradot.methods.gradot.auto_lambda import auto_lambda
    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    f = factors_for(model, split)
    cfg = GradOTConfig(keep=0.5, allocation="global")
    held_out = calib_batches(seed=5)
    lam, curve = auto_lambda(model, split, f, cfg, held_out, threshold=0.0, grid=(0.01, 1.0))
    assert lam == 1.0 and [c["lambda"] for c in curve] == [0.0, 0.01, 1.0]
    assert all(-1 <= c["cosine"] <= 1 for c in curve)
    lam, curve = auto_lambda(model, split, f, cfg, held_out, threshold=1.0, grid=(0.01, 1.0))
    base = curve[0]["cosine"]
    assert lam == max(c["lambda"] for c in curve if c["cosine"] >= base)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_layer_drop_hybrid_drops_otdagger_layers_then_fits_the_budget_inside_the_rest(allocation):
    from gradot.errors import MethodConfigError
    from gradot.methods.uniform import uniform_indices

    model = wide_model()  # 8 layers, k = 2: 4 middle layers (2..5)
    split = split_model(model, 2)
    f = factors_for(model, split)
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.4, allocation=allocation, layer_drop=0.5), f)
    stay = [split.middle[i] for i in uniform_indices(4, 2)]  # OT†'s choice: the first and last middle layers
    assert emu.manifest["settings"]["dropped_layers"] == [i for i in split.middle if i not in stay]
    assert emu.manifest["settings"]["layer_drop"] == 0.5
    assert [s["source"] for s in emu.manifest["slots"] if s["role"] == "middle"] == stay
    assert abs(emu.manifest["size"]["keep_achieved"] - 0.4) <= 0.01 * 0.4  # the budget is met inside the two
    assert "layer_drop" not in gradot_emulator(model, split, GradOTConfig(keep=0.4, allocation=allocation), f
                                               ).manifest["settings"]  # off: the manifest as before
    with pytest.raises(MethodConfigError, match="fewer than the budget"):  # two layers cannot hold 0.7
        gradot_emulator(model, split, GradOTConfig(keep=0.7, allocation=allocation, layer_drop=0.5), f)


def test_damping_changes_the_scores_as_damped_factors_do_and_is_recorded():
    from gradot.errors import MethodConfigError
    from gradot.methods.gradot import GradOTOptions
    from gradot.stats.kfac import damped

    model = wide_model()
    split = split_model(model, 2)
    f = factors_for(model, split)
    cfg = GradOTConfig(keep=0.4, allocation="global", damping=10.0)
    direct = score_middle(model, split, f, cfg)
    by_hand = score_middle(model, split, damped(f, 10.0), GradOTConfig(keep=0.4, allocation="global"))
    plain = score_middle(model, split, f, GradOTConfig(keep=0.4, allocation="global"))
    for a, b, c in zip(direct, by_hand, plain):
        torch.testing.assert_close(a.mlp.cost, b.mlp.cost)
        torch.testing.assert_close(a.attn[0].cost, b.attn[0].cost)
        assert not torch.allclose(a.mlp.cost, c.mlp.cost)  # the damping reached the scores
    emu = gradot_emulator(model, split, cfg, f)
    assert emu.manifest["settings"]["damping"] == 10.0
    assert abs(emu.manifest["size"]["keep_achieved"] - 0.4) <= 0.01 * 0.4
    assert "damping" not in gradot_emulator(model, split, GradOTConfig(keep=0.4, allocation="global"), f
                                            ).manifest["settings"]
    with pytest.raises(ValueError, match="damping"):
        GradOTConfig(keep=0.4, damping=-1.0)
    with pytest.raises(MethodConfigError, match="--damping"):
        GradOTOptions(keep=0.4, damping=-1.0)
    assert GradOTOptions(keep=0.4, damping=0.3).engine().damping == 0.3
