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


# --------------------------------------------------------------------------------------------- privacy measures


def shipped(emu, tmp_path, name):
    """The emulator as the data owner receives it: saved, then re-loaded."""
    save_emulator(emu, tmp_path / name)
    return load_emulator(tmp_path / name)


def test_privacy_measure_of_a_distilled_emulator(tmp_path):
    """A distilled layer is scored against the original layer its slot names: before training it is that
    layer bit for bit (error 0, counted exact); trained, every matrix is near it but not exact."""
    from gradot.analysis.privacy import measure, relative_error

    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    untrained = shipped(build("distill", model, distill_steps=1, distill_lr=0.0), tmp_path, "untrained")
    r0 = measure(model, untrained.model, untrained.manifest, split.middle)
    kept = {s["source"] for s in untrained.manifest["slots"] if s["role"] == "middle"}
    assert 0 < len(kept) < len(split.middle)
    for m in r0.matrices:
        assert m.own_error == (0.0 if m.layer in kept else 1.0), m
    assert r0.exact_fraction == pytest.approx(untrained.manifest["size"]["keep_achieved"])
    assert {r0.layer_status[i] for i in kept} == {"kept"}

    trained = shipped(build("distill", model), tmp_path, "trained")
    r = measure(model, trained.model, trained.manifest, split.middle)
    orig, emu = decoder_layers(model), decoder_layers(trained.model)
    for pos, slot in enumerate(trained.manifest["slots"]):
        if slot["role"] != "middle":
            continue
        for m in (m for m in r.matrices if m.layer == slot["source"]):
            W = orig[slot["source"]].get_submodule(m.name).weight
            assert m.kind == "dense" and m.modified and m.shipped_exact < 0.01, m
            assert 0 < m.own_error < 0.5
            assert m.own_error == pytest.approx(relative_error(W, emu[pos].get_submodule(m.name).weight), rel=1e-9)
    assert all(m.own_error == 1.0 for m in r.matrices if m.layer not in kept)
    assert {r.layer_status[i] for i in kept} == {"modified"} and r.layer_status[3] == "nothing"
    assert r.exact_params < 0.01 * r.middle_params < r0.exact_params
    assert r0.mean_own_error < r.mean_own_error < 1


def test_privacy_measure_of_a_scaleot_emulator(tmp_path):
    """A harmonizer is scored as its span's first layer (it is cut from it: rank-``width`` attention, the
    output projections zero until trained); the span's other layers ship nothing (error 1); the
    remaining layers are truncated-SVD attention with their MLP shipped exactly."""
    from gradot.analysis.privacy import measure

    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    width = OPTIONS["harmonizer_width"]
    untrained = shipped(build("scaleot", model, keep=0.45, harmonizer_lr=0.0), tmp_path, "untrained")
    r0 = measure(model, untrained.model, untrained.manifest, split.middle)
    slots = [s for s in untrained.manifest["slots"] if s["role"] == "middle"]
    spans = [s["replaces"] for s in slots if s.get("replaces")]
    assert any(len(span) > 1 for span in spans)  # a span with a layer that ships nothing
    orig = decoder_layers(model)

    def matrix(report, layer, name):
        return next(m for m in report.matrices if m.layer == layer and m.name == name)

    for span in spans:
        first = span[0]
        assert r0.layer_status[first] == "harmonizer"
        for name in ("self_attn.o_proj", "mlp.down_proj"):  # zero-initialised: nothing of the original
            assert matrix(r0, first, name).own_error == 1.0
        S = torch.linalg.svdvals(orig[first].self_attn.q_proj.weight.detach().double())
        assert matrix(r0, first, "self_attn.q_proj").own_error == pytest.approx(float(S[width:].norm() / S.norm()),
                                                                                 rel=1e-4)
        assert matrix(r0, first, "mlp.up_proj").shipped_exact == 1.0  # its `width` strongest channels, copied
        for i in span[1:]:
            assert r0.layer_status[i] == "replaced"
            assert all(m.own_error == 1.0 and m.kind == "none" for m in r0.matrices if m.layer == i)
    for s in slots:
        if not s.get("replaces"):
            assert r0.layer_status[s["source"]] == "lowrank"
            assert matrix(r0, s["source"], "mlp.down_proj").own_error == 0.0
    assert r0.middle_params > r0.exact_params > 0

    trained = shipped(build("scaleot", model, keep=0.45), tmp_path, "trained")
    assert trained.manifest["slots"] == untrained.manifest["slots"]
    r = measure(model, trained.model, trained.manifest, split.middle)
    for span in spans:
        assert matrix(r, span[0], "mlp.up_proj").modified  # trained channels are not the original's
        assert matrix(r, span[0], "self_attn.o_proj").own_error != 1.0  # trained away from zero
        assert all(m.own_error == 1.0 for m in r.matrices if m.layer in span[1:])
    for a, b in zip(r0.matrices, r.matrices):  # only the harmonizers were trained
        if r.layer_status[a.layer] not in ("harmonizer", "replaced"):
            assert a.own_error == b.own_error and a.best_error == b.best_error
    assert r.exact_params < r0.exact_params


def test_privacy_bench_measures_the_trained_methods(tmp_path, monkeypatch):
    """bench/privacy.py builds distill and scaleot through the registry with its training budget and
    writes their rows, training and the per-layer view."""
    from conftest import tiny_tokenizer

    folder = tmp_path / "model"
    tiny_model("llama", layers=8).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import privacy as bench

    out = tmp_path / "out"
    bench.main(["--model", str(folder), "--keep", "0.45", "--methods", "uniform,distill,scaleot",
                "--calib-sequences", "4", "--calib-len", "16", "--ppl-sequences", "2", "--ppl-len", "16",
                "--train-sequences", "12", "--train-len", "16", "--train-batch", "4", "--distill-steps", "2",
                "--option", "harmonizer_width=4", "--out", str(out)])
    info = json.loads((out / "privacy.json").read_text())
    rows = {r["method"]: r for r in info["rows"]}
    assert rows["uniform"]["training"] is None
    for method in ("distill", "scaleot"):
        t = rows[method]["training"]
        assert (t["steps"], t["tokens"]) == (2, 2 * 4 * 16)
        assert 0 < rows[method]["mean_own_error"] <= 1 + 1e-6
    assert rows["distill"]["exact_fraction"] < rows["uniform"]["exact_fraction"]
    assert rows["scaleot"]["training"]["harmonizers"] and "harmonizer" in rows["scaleot"]["layers"].values()
    md = (out / "privacy.md").read_text()
    assert "| distill | 2 | 128 |" in md and info["command"].startswith("python bench/privacy.py --model")
    with pytest.raises(SystemExit):
        bench.main(["--model", str(folder), "--methods", "uniform,nonesuch", "--out", str(out)])


def test_bench_trained_on_a_random_shape(tmp_path):
    """bench/trained.py's random:<size> path (what the GPU check runs) builds, trains and reports."""
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench" / "trained.py"
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(bench), "--model", "random:tiny", "--methods", "uniform,distill",
                           "--calib-sequences", "12", "--calib-len", "32", "--distill-steps", "2",
                           "--ppl-sequences", "4", "--ppl-len", "32", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["label"]: r for r in json.loads((out / "trained.json").read_text())["rows"]}
    assert set(rows) == {"original", "uniform", "distill"}
    assert rows["distill"]["steps"] == 2 and rows["distill"]["heldout"]["loss_after"] > 0
    assert "Model random:tiny (float32 on cpu)" in (out / "trained.md").read_text()
