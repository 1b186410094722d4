"""Where and in what precision the work runs: ``--device``, ``--dtype``, ``--bf16``.

CPU tests run everywhere. The ``cuda`` tests need a CUDA GPU: CI has none, so they are skipped
there and run on a lent GPU machine (``python -m pytest -q tests/test_device.py``); they check that
the GPU path gives the CPU's emulator and trains only the adapter.
"""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from gradot.artifacts import load_emulator
from gradot.cli.app import UsageError, main, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine)")


def _compress(capsys, model_dir, calib_file, out, *extra):
    code = main(["compress", "--model", str(model_dir), "--method", "gradot", "--allocation", "global", "--keep",
                 "0.5", "--calib", str(calib_file), "--calib-sequences", "4", "--calib-len", "16", "--out", str(out),
                 *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _logits(emulator_dir, device="cpu"):
    emu = load_emulator(emulator_dir, device=device)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return emu.model(input_ids=ids).logits.float().cpu()


def _plan(emulator_dir):
    manifest = json.loads((emulator_dir / "manifest.json").read_text())
    return [{k: v for k, v in slot.items() if k in ("source", "ranks", "channels")} for slot in manifest["slots"]]


def test_device_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    for bad, message in [("cuda", "no CUDA GPU is visible"), ("cuda:1", "no CUDA GPU is visible"),
                         ("gpu", "must be auto, cpu, cuda or cuda:N")]:
        with pytest.raises(UsageError, match=message):
            resolve_device(bad)


def test_missing_gpu_is_one_line_and_writes_nothing(monkeypatch, tiny_model_dir, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["compress", "--model", str(tiny_model_dir), "--device", "cuda", "--out", str(tmp_path / "emu")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--device cuda: no CUDA GPU is visible" in err
    assert not (tmp_path / "emu").exists()


def test_bfloat16_weights_give_a_bfloat16_emulator_close_to_float32(tiny_model_dir, calib_file, tmp_path, capsys):
    out = _compress(capsys, tiny_model_dir, calib_file, tmp_path / "fp32", "--device", "cpu")
    assert "on cpu (float32)" in out
    out = _compress(capsys, tiny_model_dir, calib_file, tmp_path / "bf16", "--device", "cpu", "--dtype", "bfloat16")
    assert "on cpu (bfloat16)" in out
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["size"]["keep_achieved"] <= 0.5
    fp32, bf16 = _logits(tmp_path / "fp32"), _logits(tmp_path / "bf16")
    assert torch.isfinite(bf16).all()
    # Statistics are accumulated in float32 either way; bf16 weights only add rounding noise.
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05


@cuda
def test_gradot_on_the_gpu_builds_the_cpu_emulator(tiny_model_dir, calib_file, tmp_path, capsys):
    _compress(capsys, tiny_model_dir, calib_file, tmp_path / "cpu", "--device", "cpu")
    out = _compress(capsys, tiny_model_dir, calib_file, tmp_path / "gpu", "--device", "cuda")
    assert "on cuda (float32)" in out
    assert _plan(tmp_path / "gpu") == _plan(tmp_path / "cpu")
    torch.testing.assert_close(_logits(tmp_path / "gpu", "cuda"), _logits(tmp_path / "cpu"), atol=2e-3, rtol=1e-3)


@cuda
def test_bf16_adapter_finetune_on_the_gpu_trains_only_the_adapter(tmp_path):
    from gradot.methods.uniform import uniform_emulator
    from gradot.finetune import FinetuneConfig, finetune_adapter
    from gradot.split import split_model

    model = tiny_model("llama")
    emu = uniform_emulator(model, split_model(model, 2), 0.5)
    before = {n: t.detach().clone() for n, t in emu.model.state_dict().items()}
    adapter = {f"model.layers.{pos}." for pos in emu.adapter_positions}
    records = [("Question : a b Answer :", " c"), ("Question : d e Answer :", " f")] * 2
    cfg = FinetuneConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, learning_rate=1e-2, bf16=True,
                         logging_steps=1, save_steps=100)
    emu, stats = finetune_adapter(emu, tiny_tokenizer(), records, cfg)
    assert next(emu.model.parameters()).device.type == "cuda"  # the Trainer put it on the GPU
    after = emu.model.state_dict()
    for name, t in before.items():
        changed = not torch.equal(t, after[name].cpu())
        assert changed == any(name.startswith(p) for p in adapter), name
    assert stats["steps"] == 2



@cuda
def test_fast_scorer_on_the_gpu_scores_as_the_harness():
    """FastHFLM on CUDA (batched contexts, copied KV caches, head on continuations only) gives the stock
    HFLM's scores on the same GPU, and the CPU's to float rounding."""
    from lm_eval.models.huggingface import HFLM
    from test_scorer import _requests

    from gradot.evaluation.scorer import FastHFLM

    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    requests = _requests(model, max_length=48)
    cpu = FastHFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=48)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    model = model.to("cuda")
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=48)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    fast = FastHFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=48)
    assert fast.device.type == "cuda"
    got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in stock]
    torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in stock], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in cpu], rtol=1e-4, atol=1e-3)


@cuda
def test_pipeline_on_the_gpu_runs_every_stage_and_scores_as_the_cpu(tiny_model_dir, calib_file, tmp_path, capsys):
    """``gradot pipeline --device cuda`` end to end (compress, fine-tune, evaluate, plug in) on a tiny
    model: every cell written; the untrained rows score as on the CPU."""
    cells = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        code = main(["pipeline", "--model", str(tiny_model_dir), "--method", "gradot", "--tasks", "arc_easy",
                     "--keep", "0.5", "--limit", "8", "--train-limit", "8", "--max-steps", "2",
                     "--train-batch-size", "4", "--calib", str(calib_file), "--calib-sequences", "4",
                     "--calib-len", "16", "--device", device, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 0, err
        cells[device] = json.loads((out / "results.json").read_text())["cells"]
    gpu, cpu = cells["cuda"], cells["cpu"]
    assert set(gpu) == set(cpu) and {"Full ZS", "Adapter FT", "gradot: Emu ZS", "gradot: Emu FT", "gradot: Plug-in"} <= set(gpu)
    for row in ("Full ZS", "gradot: Emu ZS"):
        assert gpu[row]["arc_easy"]["acc"] == cpu[row]["arc_easy"]["acc"], row

def test_layers_offloaded_by_a_device_map_compress_to_the_in_memory_emulator(tiny_model_dir, calib_file, tmp_path,
                                                                              capsys):
    # Adapter layer 0 and middle layers 2-3 live on disk (accelerate offload, weights on the meta
    # device between uses): statistics, scoring, copying and the fingerprint must load them.
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": ("disk" if i in (0, 2, 3) else "cpu") for i in range(6)}}
    (tmp_path / "map.json").write_text(json.dumps(device_map))
    for method in ("gradot", "uniform"):
        extra = ["--method", method, "--lambda-attn", "0.01", "--lambda-mlp", "0.01"]
        _compress(capsys, tiny_model_dir, calib_file, tmp_path / f"{method}-memory", *extra)
        out = _compress(capsys, tiny_model_dir, calib_file, tmp_path / f"{method}-offload", *extra,
                        "--device-map", str(tmp_path / "map.json"), "--offload-dir", str(tmp_path / "offload"))
        assert "device map" in out
        assert _plan(tmp_path / f"{method}-offload") == _plan(tmp_path / f"{method}-memory")
        memory = json.loads((tmp_path / f"{method}-memory" / "manifest.json").read_text())
        offload = json.loads((tmp_path / f"{method}-offload" / "manifest.json").read_text())
        assert offload["base"]["fingerprint"] == memory["base"]["fingerprint"]
        torch.testing.assert_close(_logits(tmp_path / f"{method}-offload"), _logits(tmp_path / f"{method}-memory"))


def test_device_map_input_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model.layers.0": "moon"}')
    for extra, message in [(["--offload-dir", "x"], "need --device-map"),
                           (["--device-map", str(bad)], "must map module names"),
                           (["--device-map", "nowhere"], "expected auto/balanced/sequential or a JSON file"),
                           (["--device-map", "auto", "--max-memory", "lots"], "expected DEVICE=SIZE")]:
        code = main(["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "emu"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
