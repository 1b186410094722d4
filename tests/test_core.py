"""Offsite-tuning core: split, baseline emulators, artifacts and plug-in on every architecture."""

import json

import pytest
import torch
from conftest import ARCHS, VOCAB, calib_batches, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from gradot.artifacts import ArtifactError, load_emulator, plug_in, save_adapter, save_emulator
from gradot.methods.crash import cluster_adjacent, crash_emulator
from gradot.methods.uniform import uniform_emulator, uniform_indices
from gradot.registry import UnsupportedModelError, arch_of, decoder_layers
from gradot.split import Split, SplitError, split_model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def build(method, model):
    split = split_model(model, 2)
    if method == "uniform":
        return uniform_emulator(model, split, 0.5)
    return crash_emulator(model, split, 0.5, calib_batches())


@pytest.mark.parametrize("arch", ARCHS)
def test_split_and_rejoin_reproduces_logits_exactly(arch, tokens):
    model = tiny_model(arch)
    emu = uniform_emulator(model, split_model(model, 2), keep=1.0)
    assert emu.manifest["size"]["keep_achieved"] == 1.0
    assert torch.equal(logits(model, tokens), logits(emu.model, tokens))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["uniform", "crash"])
def test_save_load_gives_identical_logits(arch, method, tokens, tmp_path):
    model = tiny_model(arch, layers=8)
    emu = build(method, model)
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert torch.equal(logits(emu.model, tokens), logits(loaded.model, tokens))
    assert loaded.manifest["slots"] == emu.manifest["slots"]
    # The compressed emulator really is different from the original.
    assert not torch.allclose(logits(model, tokens), logits(emu.model, tokens))


@pytest.mark.parametrize("arch", ARCHS)
def test_emulator_ships_no_tensor_of_a_dropped_layer(arch, tmp_path):
    model = tiny_model(arch, layers=8)
    emu = uniform_emulator(model, split_model(model, 2), keep=0.5)
    kept = {s["source"] for s in emu.manifest["slots"]}
    dropped = [i for i in range(8) if i not in kept]
    assert dropped, "the test needs a dropped layer"
    save_emulator(emu, tmp_path / "emu")
    layers = decoder_layers(model)
    dropped_tensors = [p for i in dropped for p in layers[i].parameters() if p.numel() > 1]
    with safe_open(str(tmp_path / "emu" / "emulator.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            assert not any(t.shape == d.shape and torch.equal(t, d) for d in dropped_tensors), key


def test_crash_shares_weights_and_keeps_depth(tokens, tmp_path):
    model = tiny_model("llama", layers=10)
    emu = crash_emulator(model, split_model(model, 2), keep=0.5, batches=calib_batches())
    slots = emu.manifest["slots"]
    assert len(slots) == 10
    assert sum(s["shares"] is not None for s in slots) == 3  # 6 middle layers -> 3 clusters
    layers = decoder_layers(emu.model)
    for pos, s in enumerate(slots):
        if s["shares"] is not None:
            assert layers[pos].mlp.up_proj.weight is layers[s["shares"]].mlp.up_proj.weight
    assert emu.manifest["size"]["keep_achieved"] == pytest.approx(0.5)
    # Shared layers still need their own KV-cache slot: cached generation equals uncached.
    with torch.no_grad():
        a = emu.model.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
        b = emu.model.generate(tokens[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)
    # Saving stores shared weights once.
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert torch.equal(logits(emu.model, tokens), logits(loaded.model, tokens))
    ll = decoder_layers(loaded.model)
    shared = next(p for p, s in enumerate(slots) if s["shares"] is not None)
    assert ll[shared].mlp.up_proj.weight is ll[slots[shared]["shares"]].mlp.up_proj.weight


def test_selection_rules():
    assert uniform_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert uniform_indices(5, 1) == [2]
    sim = torch.tensor([[1, .9, .1, .1], [.9, 1, .1, .1], [.1, .1, 1, .8], [.1, .1, .8, 1]], dtype=torch.float64)
    assert cluster_adjacent(sim, 2) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        uniform_indices(3, 4)


def test_split_errors():
    with pytest.raises(SplitError, match="needs at least 5"):
        Split(4, 2)
    with pytest.raises(SplitError, match=">= 1"):
        Split(10, 0)


def test_unknown_architecture_is_refused():
    from transformers import BertConfig
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'bert'"):
        arch_of(BertConfig())


# --------------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_roundtrip_and_plug_in(arch, tokens, tmp_path):
    model = tiny_model(arch)
    emu = uniform_emulator(model, split_model(model, 2), 0.5)
    reference = logits(model, tokens)
    # Unchanged adapter: the plug-in model is the original.
    save_adapter(emu, tmp_path / "a0")
    plug_in(model, tmp_path / "a0")
    assert torch.equal(logits(model, tokens), reference)
    # A "fine-tuned" adapter: its weights land in the original's adapter layers.
    with torch.no_grad():
        for p in emu.adapter_parameters():
            p.add_(0.05)
    save_adapter(emu, tmp_path / "a1")
    plug_in(model, tmp_path / "a1")
    assert not torch.allclose(logits(model, tokens), reference)
    top_emu = decoder_layers(emu.model)[-1]
    top_orig = decoder_layers(model)[-1]
    for (n, p), (_, q) in zip(top_emu.named_parameters(), top_orig.named_parameters()):
        assert torch.equal(p, q), n


def _adapter(tmp_path, seed=0):
    model = tiny_model("llama", seed=seed)
    emu = uniform_emulator(model, split_model(model, 2), 0.5)
    save_adapter(emu, tmp_path / f"adapter{seed}")
    return model, tmp_path / f"adapter{seed}"


def test_adapter_from_another_model_is_refused(tmp_path):
    _, adapter = _adapter(tmp_path, seed=0)
    other = tiny_model("llama", seed=7)
    with pytest.raises(ArtifactError, match="fingerprint does not match"):
        plug_in(other, adapter)


def test_adapter_for_other_layers_is_refused(tmp_path):
    _, adapter = _adapter(tmp_path)
    deeper = tiny_model("llama", layers=8)
    with pytest.raises(ArtifactError, match=r"adapter holds layers \[0, 1, 4, 5\].*\[0, 1, 6, 7\]"):
        plug_in(deeper, adapter)
    with pytest.raises(ArtifactError, match="adapter is for a 'llama' model"):
        plug_in(tiny_model("opt"), adapter)


def test_truncated_adapter_is_refused(tmp_path):
    model, adapter = _adapter(tmp_path)
    f = adapter / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="content hash does not match"):
        plug_in(model, adapter)


def _rehash(folder, name="adapter.safetensors"):
    from gradot.artifacts import sha256_file
    m = json.loads((folder / "manifest.json").read_text())
    m["files"][name]["sha256"] = sha256_file(folder / name)
    return m


def test_adapter_smuggling_other_layers_is_refused(tmp_path):
    """An adapter that carries weights for a middle layer, even with a consistent manifest."""
    model, adapter = _adapter(tmp_path)
    f = adapter / "adapter.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    smuggled = "model.layers.2.mlp.up_proj.weight"
    tensors[smuggled] = torch.zeros(64, 32)
    save_file(tensors, f)
    m = _rehash(adapter)
    m["files"]["adapter.safetensors"]["tensors"][smuggled] = {"dtype": "float32", "shape": [64, 32]}
    (adapter / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unexpected: \\['model.layers.2.mlp.up_proj.weight'\\]"):
        plug_in(model, adapter)


def test_adapter_with_wrong_shapes_is_refused(tmp_path):
    model, adapter = _adapter(tmp_path)
    f = adapter / "adapter.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:10]
    save_file(tensors, f)
    m = _rehash(adapter)
    m["files"]["adapter.safetensors"]["tensors"][name]["shape"] = [10, 32]
    (adapter / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=f"{name} has shape \\[10, 32\\], model expects \\[64, 32\\]"):
        plug_in(model, adapter)


def test_output_directory_is_not_clobbered(tmp_path):
    model = tiny_model("llama")
    emu = uniform_emulator(model, split_model(model, 2), 0.5)
    out = tmp_path / "emu"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists"):
        save_emulator(emu, out)
    assert (out / "precious.txt").read_text() == "keep me"
