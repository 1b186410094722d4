"""The trained baselines: OT's distilled emulator (``distill``) and ScaleOT's harmonizers (``scaleot``),
on tiny models of every registered architecture: training lowers the distillation loss on held-back
text, the emulators save, reload and plug in, budgets hold, interrupted training resumes to the
same weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ARCHS, calib_batches, tiny_model  # noqa: E402

from gradot.artifacts import ArtifactError, load_emulator, plug_in, save_adapter, save_emulator  # noqa: E402
from gradot.errors import MethodConfigError  # noqa: E402
from gradot.methods import Calibration, get, make_config  # noqa: E402
from gradot.registry import decoder_layers  # noqa: E402
from gradot.split import split_model  # noqa: E402

STEPS = 12
OPTIONS = dict(distill_steps=STEPS, distill_batch=4, distill_lr=1e-3, harmonizer_lr=3e-3, harmonizer_width=8)


def build(method, model, keep=0.5, **options):
    cfg = make_config(get(method).config, keep, {**OPTIONS, **options})
    calibration = Calibration(calib_batches(12, 16), {})  # 12 sequences: 2 training batches, 1 held back
    return get(method).build(model, split_model(model, 2), cfg, calibration)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def roundtrip_and_plug_in(emu, model, tmp_path, tokens):
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert torch.allclose(logits(loaded.model, tokens), logits(emu.model, tokens), atol=1e-5)
    assert loaded.manifest["slots"] == emu.manifest["slots"]
    reference = logits(model, tokens)
    with torch.no_grad():
        for p in loaded.adapter_parameters():
            p.add_(0.05)
    save_adapter(loaded, tmp_path / "adapter")
    plug_in(model, tmp_path / "adapter")
    assert not torch.allclose(logits(model, tokens), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_distill_lowers_the_loss_saves_reloads_and_plugs_in(arch, tmp_path, tokens):
    model = tiny_model(arch, layers=8)
    before = {n: p.clone() for n, p in model.named_parameters()}
    emu = build("distill", model)
    run = emu.manifest["settings"]["training"]
    assert run["heldout"]["held_back"] and run["heldout"]["loss_after"] < run["heldout"]["loss_before"]
    assert run["steps"] == STEPS and run["tokens"] == STEPS * 4 * 16  # the step budget, nothing more
    assert emu.manifest["method"] == "distill" and emu.manifest["settings"]["init"]["method"] == "uniform"
    assert run["recipe"]["kd_weight"] == 1.0 and run["recipe"]["distill_steps"] == STEPS
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original untouched
    # Adapter layers, embeddings and head frozen: still the original's.
    layers, orig = decoder_layers(emu.model), decoder_layers(model)
    for pos, src in zip(emu.adapter_positions, emu.adapter_sources):
        assert all(torch.equal(a, b) for a, b in zip(layers[pos].parameters(), orig[src].parameters()))
    assert torch.equal(emu.model.get_input_embeddings().weight, model.get_input_embeddings().weight)
    roundtrip_and_plug_in(emu, model, tmp_path, tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_scaleot_harmonizers_train_save_reload_and_plug_in(arch, tmp_path, tokens):
    model = tiny_model(arch, layers=8)
    emu = build("scaleot", model, keep=0.45)
    settings, size = emu.manifest["settings"], emu.manifest["size"]
    harmonizers = settings["harmonizers"]
    assert harmonizers and all(s.get("replaces") is None or s["role"] == "middle" for s in emu.manifest["slots"])
    replaced = [i for h in harmonizers for i in h["replaces"]]
    sources = [s["source"] for s in emu.manifest["slots"]]
    assert not set(replaced) & set(sources) - {h["replaces"][0] for h in harmonizers}  # replaced layers are gone
    assert size["keep_achieved"] <= 0.45  # harmonizers count in the budget
    run = settings["training"]
    assert run["heldout"]["loss_after"] < run["heldout"]["loss_before"]
    assert run["trained_params"] == sum(h["params"] for h in harmonizers)
    assert len(settings["importance"]["bypass_loss_increase"]) == 4  # one per middle layer
    roundtrip_and_plug_in(emu, model, tmp_path, tokens)


def test_a_harmonizer_starts_as_the_bypass(tokens):
    """Untrained (zero output projections), a harmonizer computes the identity: the emulator is the
    layer drop of its span."""
    model = tiny_model("llama", layers=8)
    emu = build("scaleot", model, keep=0.45, distill_steps=1, harmonizer_lr=0.0)
    positions = [h["position"] for h in emu.manifest["settings"]["harmonizers"]]
    layers = decoder_layers(emu.model)
    seen = {}
    hooks = [layers[p].register_forward_hook(lambda m, a, k, o, p=p: seen.__setitem__(p, (a[0] if a else k["hidden_states"], o)),
                                             with_kwargs=True) for p in positions]
    logits(emu.model, tokens)
    for h in hooks:
        h.remove()
    for inp, out in seen.values():
        assert torch.equal(inp, out[0] if isinstance(out, tuple) else out)


def test_token_budget_and_init_option():
    model = tiny_model("qwen2", layers=8)
    emu = build("distill", model, distill_tokens=100, init="svd")  # 64 tokens a step: stops after 2
    run = emu.manifest["settings"]["training"]
    assert (run["steps"], run["tokens"]) == (2, 128)
    assert emu.manifest["settings"]["init"]["method"] == "svd"
    with pytest.raises(MethodConfigError, match="training-free"):
        make_config(get("distill").config, 0.5, {"init": "scaleot"})
    with pytest.raises(MethodConfigError, match="training-free"):
        make_config(get("distill").config, 0.5, {"init": "nonesuch"})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["distill", "scaleot"])
def test_interrupted_training_resumes_to_the_same_weights(method, tmp_path, monkeypatch):
    from gradot.methods import distill

    model = tiny_model("llama", layers=8)
    options = dict(distill_steps=6, checkpoint_every=2)
    whole = build(method, model, **options, distill_checkpoint=str(tmp_path / "whole"))

    def stop(step):
        if step == 5:  # after the checkpoint at 4: step 5 is lost and redone
            raise Interrupt

    monkeypatch.setattr(distill, "_after_step", stop)
    with pytest.raises(Interrupt):
        build(method, model, **options, distill_checkpoint=str(tmp_path / "ckpt"))
    monkeypatch.setattr(distill, "_after_step", None)
    resumed = build(method, model, **options, distill_checkpoint=str(tmp_path / "ckpt"))
    assert resumed.manifest["settings"]["training"]["resumed_at_step"] == 4
    assert resumed.manifest["settings"]["training"]["steps"] == 6
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    # A checkpoint of another recipe is refused, not silently resumed.
    with pytest.raises(MethodConfigError, match="another training recipe"):
        build(method, model, distill_steps=6, checkpoint_every=2, kd_weight=0.5,
              distill_checkpoint=str(tmp_path / "ckpt"))


def test_harmonizer_spans_are_validated(tmp_path):
    model = tiny_model("llama", layers=8)
    emu = build("scaleot", model, keep=0.45, distill_steps=1)
    save_emulator(emu, tmp_path / "emu")
    path = tmp_path / "emu" / "manifest.json"
    good = json.loads(path.read_text())
    pos = next(i for i, s in enumerate(good["slots"]) if s.get("replaces"))
    for bad in ([good["slots"][pos]["source"] + 1], [], [0], "2", [good["slots"][pos]["source"], 99]):
        manifest = json.loads(json.dumps(good))
        manifest["slots"][pos]["replaces"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match="replaces"):
            load_emulator(tmp_path / "emu")


def test_compress_cli_offers_the_trained_methods(tmp_path):
    from conftest import tiny_tokenizer

    from gradot.cli import main

    folder = tmp_path / "model"
    tiny_model("llama", layers=8).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat and it was a good day for a walk in the park . " * 200)
    out = tmp_path / "emu"
    assert main(["compress", "--model", str(folder), "--keep", "0.45", "--out", str(out), "--calib", str(calib),
                 "--calib-sequences", "8", "--calib-len", "16", "--method", "scaleot", "--distill-steps", "3",
                 "--harmonizer-width", "3", "--attn-keep", "0.6", "--distill-checkpoint", str(tmp_path / "ck")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "scaleot" and manifest["settings"]["harmonizer"]["width"] == 3
    assert manifest["settings"]["training"]["steps"] == 3
    assert "distill_checkpoint" not in manifest["settings"]["training"]["recipe"]  # a runtime setting
    load_emulator(out)
