"""The large-model compression path (gradient checkpointing, a few layers' statistics per pass) gives
the same emulator as the in-memory path; statistics without gradients change nothing at lambda 0."""

import json

import pytest
import torch
from conftest import calib_batches, tiny_model

from gradot.cli import main
from gradot.methods.gradot import GradOTConfig, collect_and_score, gradot_emulator, middle_linears
from gradot.stats.kfac import collect_kfac
from gradot.split import split_model


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: OpenMP threads only add synchronisation (badly so on a busy machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def in_memory(model, split, cfg, batches):
    factors = collect_kfac(model, middle_linears(model, split), batches, progress=False)
    return gradot_emulator(model, split, cfg, factors)


@pytest.mark.parametrize("cfg", [
    GradOTConfig(keep=0.5),
    GradOTConfig(keep=0.4, allocation="global-layers", lambda_attn=0.1, lambda_mlp=0.01),
    GradOTConfig(keep=0.6, selection="wanda"),
], ids=["uniform", "global-layers-lambda", "wanda"])
def test_layer_by_layer_with_checkpointing_gives_the_same_emulator(cfg, tokens):
    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    batches = calib_batches()
    reference = in_memory(model, split, cfg, batches)

    timings = {}
    scores = collect_and_score(model, split, cfg, batches, layers_per_pass=1, gradient_checkpointing=True,
                               progress=False, timings=timings)
    assert [s.index for s in scores] == split.middle
    assert set(timings) == {"statistics_s", "scores_s"}
    large = gradot_emulator(model, split, cfg, None, scores=scores)

    assert large.manifest["slots"] == reference.manifest["slots"]
    assert large.manifest["size"] == reference.manifest["size"]
    assert torch.allclose(logits(large.model, tokens), logits(reference.model, tokens), atol=1e-5)
    # The model is left as it was: no checkpointing, no hooks, parameters trainable again.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_chunks_of_several_layers_and_a_last_short_chunk(tokens):
    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)  # 4 middle layers: chunks of 3 + 1
    cfg = GradOTConfig(keep=0.5, allocation="global")
    reference = in_memory(model, split, cfg, calib_batches())
    scores = collect_and_score(model, split, cfg, calib_batches(), layers_per_pass=3, progress=False)
    large = gradot_emulator(model, split, cfg, None, scores=scores)
    assert large.manifest["slots"] == reference.manifest["slots"]
    assert torch.allclose(logits(large.model, tokens), logits(reference.model, tokens), atol=1e-5)


def test_statistics_without_gradients():
    model = tiny_model("llama", layers=6)
    split = split_model(model, 2)
    modules = middle_linears(model, split)
    full = collect_kfac(model, modules, calib_batches(), progress=False)
    light = collect_kfac(model, modules, calib_batches(), progress=False, gradients=False)
    for name in modules:
        assert light[name].grad is None
        assert torch.equal(light[name].A, full[name].A)
        assert torch.equal(light[name].G, full[name].G)
    cfg = GradOTConfig(keep=0.5, allocation="global-layers")
    a, b = gradot_emulator(model, split, cfg, full), gradot_emulator(model, split, cfg, light)
    assert a.manifest["slots"] == b.manifest["slots"]
    with pytest.raises(ValueError, match="gradients=True"):
        gradot_emulator(model, split, GradOTConfig(keep=0.5, lambda_attn=0.1), light)


def test_cli_layers_per_pass(tiny_model_dir, calib_file, tmp_path, capsys):
    common = ["compress", "--model", tiny_model_dir, "--method", "gradot", "--keep", "0.5", "--calib", calib_file,
              "--calib-sequences", "4", "--calib-len", "16", "--allocation", "global"]
    assert main([str(a) for a in common + ["--out", tmp_path / "a"]]) == 0
    assert main([str(a) for a in common + ["--out", tmp_path / "b", "--layers-per-pass", "1",
                                           "--gradient-checkpointing"]]) == 0
    slots = [json.loads((tmp_path / d / "manifest.json").read_text())["slots"] for d in ("a", "b")]
    assert slots[0] == slots[1]
    capsys.readouterr()
    code = main([str(a) for a in common + ["--out", tmp_path / "c", "--layers-per-pass", "1", "--auto-lambda", "0.9"]])
    assert code == 2 and "--layers-per-pass" in capsys.readouterr().err
