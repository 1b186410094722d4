"""Transfer ratios (accuracy and loss) and training-free compensation of an emulator."""

import json
import math

import pytest
import torch

from conftest import calib_batches, tiny_model, tiny_tokenizer
from gradot.artifacts import load_emulator, save_emulator
from gradot.methods.crash import crash_emulator
from gradot.methods.uniform import uniform_emulator
from gradot.analysis.compensate import CompensationError, compensate
from gradot.analysis.proxy import encode_pairs
from gradot.registry import decoder_layers
from gradot.split import adapter_state_dict, split_model
from gradot.analysis.transfer import accuracy_transfer, answer_losses, loss_transfer, ratio_of_means


def test_accuracy_transfer_endpoints_and_error():
    assert accuracy_transfer((0.60, 0.02), (0.50, 0.02), (0.60, 0.02))[0] == pytest.approx(1.0)
    assert accuracy_transfer((0.50, 0.02), (0.50, 0.02), (0.60, 0.02))[0] == pytest.approx(0.0)
    r, se = accuracy_transfer((0.55, 0.02), (0.50, 0.02), (0.60, 0.02))
    assert r == pytest.approx(0.5)
    # Delta method: sqrt(sp² + r² sa² + (r-1)² sz²) / gain.
    assert se == pytest.approx(math.sqrt(0.02**2 * (1 + 0.25 + 0.25)) / 0.1)
    assert math.isnan(accuracy_transfer((0.5, 0.1), (0.5, 0.1), (0.5, 0.1))[0])


def test_ratio_of_means_is_paired():
    den = [1.0, 2.0, 3.0, 4.0]
    r, se = ratio_of_means([2 * d for d in den], den)
    assert r == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)  # exactly proportional: no error
    r, se = ratio_of_means([1.0, 3.0, 2.0, 6.0], den)
    assert r == pytest.approx(1.2) and se > 0
    with pytest.raises(ValueError):
        ratio_of_means([1.0], [1.0])


def test_loss_transfer_is_one_when_plugged_equals_direct_and_zero_when_unchanged():
    base, direct = [3.0, 2.5, 4.0], [2.0, 2.0, 3.0]
    assert loss_transfer(base, direct, direct)[0] == pytest.approx(1.0)
    assert loss_transfer(base, base, direct)[0] == pytest.approx(0.0)


def test_answer_losses_count_only_the_answer():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    pairs = [("the cat sat", " on the mat"), ("a b c d e f", " g")]
    losses = answer_losses(model, tok, pairs, batch_size=2)
    with torch.no_grad():  # the model's own loss (every logit formed), one row at a time: no padding
        own = [float(model(**encode_pairs(tok, [p])).loss) for p in pairs]
    assert losses == pytest.approx(own, rel=1e-5)
    assert all(v > 0 for v in losses)


def _top_stream(model, emulator_or_model, batches, index):
    """Residual stream entering decoder layer ``index`` of a model, over the batches."""
    out = []
    layer = decoder_layers(emulator_or_model)[index]
    h = layer.register_forward_pre_hook(lambda m, a, k: out.append((a[0] if a else k["hidden_states"]).clone()),
                                        with_kwargs=True)
    with torch.no_grad():
        for ids in batches:
            emulator_or_model(input_ids=ids, use_cache=False)
    h.remove()
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("scope", ["all", "last"])
def test_compensation_brings_the_top_adapter_input_closer_to_the_original(arch, scope):
    model = tiny_model(arch, layers=8)
    split = split_model(model, 2)
    emu = uniform_emulator(model, split, 0.5)
    # In-sample: a random model's dropped layers add nothing its kept MLPs can predict on new tokens
    # (bench/transfer.py measures generalisation on the real model); least squares must still fit.
    fit = held_out = calib_batches(n=16, seq=16, seed=1)
    top_pos = emu.adapter_positions[len(emu.adapter_positions) // 2]
    want = _top_stream(model, model, held_out, split.top[0])
    before = (_top_stream(model, emu.model, held_out, top_pos) - want).norm()
    adapters = {k: v.clone() for k, v in adapter_state_dict(emu.model, emu.adapter_positions).items()}
    compensate(model, emu, fit, ridge=1e-2, scope=scope)
    after = (_top_stream(model, emu.model, held_out, top_pos) - want).norm()
    assert after < before
    # The adapter layers, what the data owner trains and the owner's model must match, are untouched.
    for name, t in adapter_state_dict(emu.model, emu.adapter_positions).items():
        assert torch.equal(t, adapters[name])
    record = emu.manifest["settings"]["compensation"]
    assert record["scope"] == scope and all(e < 1 for e in record["relative_error"].values())


def test_compensated_emulator_saves_and_loads(tmp_path):
    model = tiny_model("llama", layers=8)
    emu = compensate(model, uniform_emulator(model, split_model(model, 2), 0.5), calib_batches(n=8, seq=16))
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    ids = calib_batches(n=2, seq=16, seed=3)[0]
    with torch.no_grad():
        assert torch.allclose(loaded.model(input_ids=ids).logits, emu.model(input_ids=ids).logits, atol=1e-5)
    assert loaded.manifest["settings"]["compensation"]["ridge"] == 1e-2


def test_compensation_refuses_shared_layers_and_bad_settings():
    model = tiny_model("llama", layers=8)
    split = split_model(model, 2)
    shared = crash_emulator(model, split, 0.5, calib_batches())
    if any(s.shares is not None for s in shared.slots):
        with pytest.raises(CompensationError):
            compensate(model, shared, calib_batches())
    emu = uniform_emulator(model, split, 0.5)
    with pytest.raises(ValueError):
        compensate(model, emu, calib_batches(), scope="first")
    with pytest.raises(ValueError):
        compensate(model, emu, calib_batches(), ridge=0)


def test_bench_report_keeps_every_cached_cell(tmp_path, monkeypatch):
    """bench/transfer.py's report covers every cell in its folder: a rerun for one emulator must not
    drop the rows of earlier commands from transfer.md."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import transfer as bench

    def cell(task, spec_text, recipe_text, ratio):
        emulator = bench.parse_spec(spec_text, bench.EMULATOR_KEYS, bench.EMULATOR_DEFAULTS, True)
        recipe = bench.parse_spec(recipe_text, bench.RECIPE_KEYS, bench.RECIPE_DEFAULTS, False)
        value = {"task": task, "emulator": emulator, "recipe": recipe, "transfer": [ratio, 0.01],
                 "emu_before": [7.0], "emu_after": [5.0], "grad_cosine": [0.3, 0.05],
                 "training": {"seconds_per_step": 1.0}}
        name = f"cell-{task}-{bench.slug(emulator)}-{bench.slug(recipe)}.json"
        (tmp_path / "cells" / name).write_text(json.dumps(value))
        record = {"keep_achieved": emulator["keep"], "perplexity": 100.0, "compress_seconds": 1.0}
        (tmp_path / "cells" / f"emulator-{bench.slug(emulator)}.json").write_text(json.dumps(record))

    (tmp_path / "cells").mkdir()
    cell("arc_easy", "uniform:keep=0.4", "steps=30,lr=1e-4", 0.061)  # labelled against the names' defaults
    cell("sciq", "gradot:keep=0.7", "steps=30,lr=3e-4", 0.792)
    bench.main(["--out", str(tmp_path), "--report-only", "--tasks", "arc_easy",
                "--emulators", "uniform:keep=0.4", "--recipes", "steps=30,lr=1e-4"])
    md = (tmp_path / "transfer.md").read_text()
    assert "| uniform keep=0.4 | steps=30 |" in md and "**0.06 ± 0.01**" in md
    assert "| gradot keep=0.7 | lr=0.0003, steps=30 |" in md and "**0.79 ± 0.01**" in md
    assert "| arc_easy | sciq |" in md  # the requested task first, then the others the folder holds
    assert len(json.loads((tmp_path / "transfer.json").read_text())["rows"]) == 2


def test_frontier_interpolates_along_the_keep_curve_and_never_extrapolates(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier

    def pt(keep, loss, transfer):
        return {"keep": keep, "ppl": 10 * loss, "loss": loss, "transfer": transfer, "se": 0.02}

    # Held-out loss is not monotone in keep here (0.85 above 0.7): both segments reaching 6.6 count, the best wins.
    curve = [pt(0.4, 9.0, 0.3), pt(0.55, 8.0, 0.6), pt(0.7, 6.5, 0.8), pt(0.85, 6.7, 0.9)]
    assert frontier.interpolate(curve, 8.5, "loss") == (pytest.approx(0.45), 0.02)
    assert frontier.interpolate(curve, 6.6, "loss")[0] == pytest.approx(0.85)  # 0.7-0.85, not 0.55-0.7 (0.78)
    assert frontier.interpolate(curve, 9.5, "loss") is None and frontier.interpolate(curve, 6.0, "loss") is None
    other = {("arc_easy", "gradot"): curve, ("arc_easy", "uniform"): [pt(0.85, 8.5, 0.7), pt(0.4, 12.0, 0.1)]}
    rows = frontier.dominance(other)
    assert [r["gradot_at_loss"] for r in rows][1] is None  # uniform 0.4 is more private than any GradOT point
    assert rows[0]["gradot_at_loss"][1] == pytest.approx(0.45 - 0.7)  # GradOT below OT† there: reported, negative


def test_frontier_curves_are_per_method_and_allocation_and_skip_levers(monkeypatch, tmp_path):
    """A non-default allocation is a curve of its own; an emulator with any other lever is not a point."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier
    from transfer import EMULATOR_DEFAULTS, slug

    recipe = {"lr": 3e-4, "steps": 30, "lora": 0, "pull": 0.0, "loss": "answer"}
    for i, extra in enumerate(({"method": "gradot"}, {"method": "gradot", "allocation": "global-layers"},
                               {"method": "uniform"}, {"method": "gradot", "lambda": 0.1})):
        spec = {**EMULATOR_DEFAULTS, "keep": 0.7, **extra}
        (tmp_path / f"emulator-{slug(spec)}.json").write_text(json.dumps({"keep_achieved": 0.7, "perplexity": 90.0 + i}))
        cell = {"task": "arc_easy", "emulator": spec, "recipe": recipe, "emu_before": [6.0, 7.0],
                "transfer": [0.5 + i / 10, 0.02]}
        (tmp_path / f"cell-{i}.json").write_text(json.dumps(cell))
    curves = frontier.loss_points(tmp_path, recipe, ["uniform", "gradot"])
    assert sorted(curves) == [("arc_easy", "gradot"), ("arc_easy", "gradot global-layers"), ("arc_easy", "uniform")]
    assert curves["arc_easy", "gradot global-layers"][0]["transfer"] == pytest.approx(0.6)
    assert curves["arc_easy", "gradot global-layers"][0]["ppl"] == 91.0


def test_frontier_mean_curve_uses_only_keeps_measured_on_every_task(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import frontier

    def pt(keep, ppl, loss, transfer, se=0.03):
        return {"keep": keep, "keep_achieved": keep, "ppl": ppl, "loss": loss, "transfer": transfer, "se": se}

    curves = {("a", "gradot"): [pt(0.45, 490, 9.0, 0.5), pt(0.7, 91, 6.0, 0.8)],
              ("b", "gradot"): [pt(0.45, 490, 8.0, 0.4), pt(0.7, 91, 5.0, 0.9), pt(0.85, 47, 4.0, 1.0)],
              ("a", "uniform"): [pt(0.85, 451, 8.5, 0.8)], ("b", "uniform"): [pt(0.85, 451, 7.5, 0.3)]}
    means = frontier.mean_curves(curves)
    assert sorted(means) == [("mean (a, b)", "gradot"), ("mean (a, b)", "uniform")]
    g = means["mean (a, b)", "gradot"]
    assert [q["keep"] for q in g] == [0.45, 0.7]  # 0.85 was measured on one task only: left out
    assert g[1]["transfer"] == pytest.approx(0.85) and g[1]["loss"] == pytest.approx(5.5) and g[1]["ppl"] == 91
    assert g[0]["se"] == pytest.approx(math.hypot(0.03, 0.03) / 2)
    assert means["mean (a, b)", "uniform"][0]["transfer"] == pytest.approx(0.55)
    assert frontier.mean_curves({("a", "gradot"): curves["a", "gradot"]}) == {}
    rows = frontier.dominance({**curves, **means})
    mean_row = next(r for r in rows if r["task"] == "mean (a, b)")
    assert mean_row["gradot_at_ppl"] is not None  # compared like a task's curve


def test_bench_defaults_are_the_librarys_and_cached_cell_names_stay(monkeypatch):
    """bench/transfer.py takes keep, the method options and the learning rate from the library, checks
    specs through the method registry, and names cells as it always did (cached cells are found)."""
    from pathlib import Path

    from gradot.finetune import TASK_LR
    from gradot.methods import DEFAULT_KEEP

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import transfer as bench

    spec = bench.parse_spec("gradot", bench.EMULATOR_KEYS, bench.EMULATOR_DEFAULTS, True)
    recipe = bench.parse_spec("", bench.RECIPE_KEYS, bench.RECIPE_DEFAULTS, False)
    assert spec["keep"] == DEFAULT_KEEP and spec["allocation"] == "global" and recipe["lr"] == TASK_LR["default"]
    # names of cells committed under results/transfer/cells, computed before the defaults moved
    assert bench.slug(bench.parse_spec("gradot:keep=0.4", bench.EMULATOR_KEYS, bench.EMULATOR_DEFAULTS, True)) \
        == "gradot-591ddf4c"
    assert bench.slug(bench.parse_spec("steps=30", bench.RECIPE_KEYS, {**bench.RECIPE_DEFAULTS, "lr": 1e-4}, False)) \
        == "recipe-steps30-a2c6a777"
    assert bench.slug(bench.parse_spec("steps=30,lr=3e-4", bench.RECIPE_KEYS, bench.RECIPE_DEFAULTS, False)) \
        == "recipe-lr0.0003-steps30-36d73d0d"
    for bad in ("gradot:keep=1.5", "gradot:allocation=most", "gradot:layer_drop=1.2", "nomethod:keep=0.5"):
        with pytest.raises(SystemExit):
            bench.parse_spec(bad, bench.EMULATOR_KEYS, bench.EMULATOR_DEFAULTS, True)
