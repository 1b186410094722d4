"""The healing attack and the model owner's audit, on tiny models: resumable to the bit, the
random-middle reference, the gap arithmetic, the attack text, and ``gradot audit``'s errors."""

import gzip
import json
import math

import pytest
import torch

from conftest import VOCAB, tiny_model, tiny_tokenizer
from gradot.analysis.audit import audit_budgets, check_fits, gaps, random_middle_reference
from gradot.errors import HealError
from gradot.analysis.healing import HealConfig, attack_sequences, heal, read_documents, trainable_parameters
from gradot.registry import decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _sequences(n=16, seq=8, seed=3):
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _measure(model, tokens=0):
    ids = _sequences(2, 8, seed=9)
    with torch.no_grad():
        return {"perplexity": math.exp(float(model(input_ids=ids, labels=ids).loss))}


CONFIG = HealConfig(budgets=(0, 32, 64), seq_len=8, batch_size=2, warmup_steps=1, lr=1e-3, checkpoint_every=1)


def test_healing_lowers_the_loss_and_reports_every_budget(tmp_path):
    model = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    records = heal(model, _sequences(), CONFIG, _measure, tmp_path / "ckpt")
    assert [r["tokens"] for r in records] == [0, 32, 64] and [r["steps"] for r in records] == [0, 2, 4]
    assert records[-1]["perplexity"] < records[0]["perplexity"]
    assert records[-1]["cpu_seconds"] > 0


class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_identical_numbers(tmp_path):
    whole = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    expected = heal(whole, _sequences(), CONFIG, _measure, tmp_path / "whole")

    calls = {"n": 0}

    def stop_mid_budget(module, args):  # the 4th training forward (inside the last budget) dies
        if module.training:
            calls["n"] += 1
            if calls["n"] == 4:
                raise Stop

    model = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    handle = model.register_forward_pre_hook(stop_mid_budget)
    with pytest.raises(Stop):
        heal(model, _sequences(), CONFIG, _measure, tmp_path / "resumed")
    handle.remove()
    fresh = trainable_parameters(tiny_model("llama"), "all", [2, 3])  # a new process: weights from the checkpoint
    got = heal(fresh, _sequences(), CONFIG, _measure, tmp_path / "resumed")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]  # noqa: E731
    assert strip(got) == strip(expected)
    for (name, a), (_, b) in zip(whole.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    model = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    heal(model, _sequences(), HealConfig(budgets=(0, 16), seq_len=8, batch_size=2), _measure, tmp_path / "c")
    with pytest.raises(HealError, match="other settings"):
        heal(model, _sequences(), HealConfig(budgets=(0, 16), seq_len=8, batch_size=2, lr=1e-3), _measure,
             tmp_path / "c")


def test_a_run_asked_for_more_budgets_resumes_and_a_skipped_one_is_refused(tmp_path):
    model = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    short = heal(model, _sequences(), HealConfig(budgets=(0, 32), seq_len=8, batch_size=2, warmup_steps=1, lr=1e-3),
                 _measure, tmp_path / "c")
    fresh = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    longer = heal(fresh, _sequences(), CONFIG, _measure, tmp_path / "c")
    whole = heal(trainable_parameters(tiny_model("llama"), "all", [2, 3]), _sequences(), CONFIG, _measure,
                 tmp_path / "whole")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rs]  # noqa: E731
    assert strip(longer[:2]) == strip(short) and strip(longer) == strip(whole)
    skipped = HealConfig(budgets=(0, 16, 32, 64), seq_len=8, batch_size=2, warmup_steps=1, lr=1e-3)
    with pytest.raises(HealError, match="did not measure it"):
        heal(trainable_parameters(tiny_model("llama"), "all", [2, 3]), _sequences(), skipped, _measure, tmp_path / "c")


def test_too_little_text_and_bad_settings_are_refused(tmp_path):
    model = trainable_parameters(tiny_model("llama"), "all", [2, 3])
    with pytest.raises(HealError, match="cannot feed"):
        heal(model, _sequences(2), CONFIG, _measure, tmp_path / "c")
    for bad in [dict(budgets=(32, 0)), dict(budgets=(-1,)), dict(lr=0.0), dict(train="head"), dict(seq_len=1)]:
        with pytest.raises(HealError):
            HealConfig(**bad)


def test_the_reference_keeps_embeddings_head_and_adapter_and_redraws_the_middle():
    model = tiny_model("llama")
    ref = random_middle_reference(model, [2, 3])
    layers, ref_layers = decoder_layers(model), decoder_layers(ref)
    for i in (0, 1, 4, 5):
        assert all(torch.equal(a, b) for a, b in zip(layers[i].parameters(), ref_layers[i].parameters()))
    for i in (2, 3):
        a, b = layers[i].self_attn.q_proj.weight, ref_layers[i].self_attn.q_proj.weight
        assert not torch.equal(a, b) and abs(float(b.detach().std()) - model.config.initializer_range) < 0.01
    assert torch.equal(model.get_input_embeddings().weight, ref.get_input_embeddings().weight)


def test_which_parameters_each_attacker_trains():
    model = trainable_parameters(tiny_model("llama"), "middle", [2, 3])
    layers = decoder_layers(model)
    assert all(p.requires_grad for i in (2, 3) for p in layers[i].parameters())
    assert not any(p.requires_grad for i in (0, 1, 4, 5) for p in layers[i].parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    lora = trainable_parameters(tiny_model("llama"), "lora", [2, 3], lora_r=2)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


def test_gap_and_protected_share():
    original = {"perplexity": 10.0, "arc_easy": 0.6}
    reference = [{"tokens": 0, "perplexity": 1000.0, "arc_easy": 0.25}, {"tokens": 64, "perplexity": 100.0, "arc_easy": 0.3}]
    healed = [{"tokens": 0, "perplexity": 100.0, "arc_easy": 0.4}, {"tokens": 64, "perplexity": 10.0, "arc_easy": 0.6},
              {"tokens": 128, "perplexity": 12.0, "arc_easy": 0.5}]
    rows = gaps(healed, original, reference, ["arc_easy"])
    assert rows[0]["ppl_protected"] == pytest.approx(0.5) and rows[0]["acc_protected"] == pytest.approx(0.2 / 0.35)
    assert rows[1]["ppl_protected"] == pytest.approx(0.0) and rows[1]["arc_easy_gap"] == pytest.approx(0.0)
    assert "ppl_protected" not in rows[2] and rows[2]["ppl_gap"] == pytest.approx(math.log(1.2))


def test_attack_text_formats_mixture_and_prefix(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("the cat sat on the mat . " * 40)
    race = tmp_path / "r.jsonl.gz"
    with gzip.open(race, "wt") as f:
        for _ in range(20):
            f.write(json.dumps({"article": "he was in the park with a dog . " * 3, "questions": []}) + "\n")
    alpaca = tmp_path / "i.json"
    alpaca.write_text(json.dumps([{"instruction": "a b c", "input": "", "output": "d e f g h"}] * 30))
    assert read_documents(race)[0].startswith("he was") and read_documents(alpaca)[0] == "a b c\nd e f g h"
    tok = tiny_tokenizer()
    small = attack_sequences(tok, [plain, race, alpaca], 48, 8)
    large = attack_sequences(tok, [plain, race, alpaca], 160, 8)
    assert small.shape == (6, 8) and torch.equal(large[:6], small)  # every budget sees a prefix of one stream
    firsts = [tok.decode(s[:1]) for s in small[:3]]
    assert firsts[0] == "the" and firsts[1] == "he" and firsts[2] == "a"  # round-robin over the files
    with pytest.raises(HealError, match="tokens in 8-token sequences"):
        attack_sequences(tok, [alpaca], 10_000, 8)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"title": 1}\n')
    with pytest.raises(HealError, match="b.jsonl:1"):
        read_documents(bad)


def test_audit_budgets_are_whole_steps_up_to_the_budget():
    assert audit_budgets(262_144, 2048) == (0, 4096, 32768, 262144)
    assert audit_budgets(64, 32) == (0, 32, 64)
    assert audit_budgets(0, 32) == (0,)


def test_an_emulator_of_another_model_is_refused():
    from gradot.methods.uniform import uniform_emulator
    from gradot.split import split_model

    model = tiny_model("llama")
    emu = uniform_emulator(model, split_model(model, 2), 0.5)
    check_fits(emu.manifest, model)
    with pytest.raises(HealError, match="another model"):
        check_fits(emu.manifest, tiny_model("llama", seed=5))


def _audit(capsys, *argv):
    from gradot.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gradot_audit_runs_resumes_and_refuses_bad_input(tiny_model_dir, calib_file, tmp_path, capsys):
    emu, out = tmp_path / "emu", tmp_path / "audit"
    assert _audit(capsys, "compress", "--model", tiny_model_dir, "--method", "uniform", "--keep", "0.5",
                  "--out", emu)[0] == 0
    argv = ["audit", emu, "--model", tiny_model_dir, "--budget", "64", "--text", calib_file, "--ppl-text", calib_file,
            "--tasks", "none", "--ppl-tokens", "512", "--ppl-len", "64", "--seq-len", "16", "--batch-size", "2",
            "--out", out]
    code, text, err = _audit(capsys, *argv)
    assert code == 0, err
    report = json.loads((out / "audit.json").read_text())
    assert [r["tokens"] for r in report["emulator_records"]] == [0, 32, 64]
    assert [r["tokens"] for r in report["reference_records"]] == [0, 32, 64]
    assert all(r["ppl_protected"] is not None for r in report["emulator_rows"])
    assert "| **random-middle reference** |" in (out / "audit.md").read_text()
    code, text, err = _audit(capsys, *argv)  # resumes: nothing is recomputed, the numbers are the same
    assert code == 0 and "step" not in text and json.loads((out / "audit.json").read_text()) == report
    for bad, message in [(["--budget", "12x"], "--budget"), (["--tasks", "nope"], "unknown nope"),
                         (["--text", tmp_path / "missing.txt"], "not found")]:
        code, _, err = _audit(capsys, *argv, *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    tiny_model("llama", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    capsys.readouterr()  # the save's own progress bar
    code, _, err = _audit(capsys, *[a if a != tiny_model_dir else other for a in argv])
    errors = [line for line in err.splitlines() if line.startswith("gradot audit: error")]
    assert code == 2 and len(errors) == 1 and "another model" in errors[0]  # (model loading may draw a bar)
