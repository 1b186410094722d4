"""The command line on a tiny local model folder: compress, info, plugin, and clean errors."""

import re

import pytest

from gradot.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("method,extra", [
    ("uniform", []), ("crash", []), ("svd", []), ("wanda", []),
    ("gradot", ["--allocation", "global-layers", "--lambda-attn", "0.01", "--lambda-mlp", "0.01"]),
    ("gradot", ["--auto-lambda", "0.9"]),
])
def test_compress_info_plugin(method, extra, tiny_model_dir, calib_file, tmp_path, capsys):
    emu = tmp_path / "emu"
    code, out, err = run(capsys, "compress", "--model", tiny_model_dir, "--method", method, "--keep", "0.5",
                         "--out", emu, "--calib", calib_file, "--calib-sequences", "4", "--calib-len", "16", *extra)
    assert code == 0, err
    kept = float(re.search(rf"method {method}, kept ([0-9.]+) of the middle block", out).group(1))
    assert 0.49 <= kept <= 0.5  # within one unit of the budget on a tiny model
    code, out, _ = run(capsys, "info", emu)
    assert code == 0 and f"method: {method}" in out and "adapter: k=2  layers [0, 1] + [4, 5]" in out
    if "--auto-lambda" in extra:
        assert "auto_lambda: {'threshold': 0.9, 'chosen':" in out
    elif method == "gradot":
        assert "lambda_attn: 0.01" in out and "allocation: global-layers" in out and "calibration" in out

    from gradot.artifacts import load_emulator, save_adapter
    save_adapter(load_emulator(emu), tmp_path / "adapter")
    code, out, err = run(capsys, "plugin", "--model", tiny_model_dir, "--adapter", tmp_path / "adapter",
                         "--out", tmp_path / "plugged")
    assert code == 0, err
    assert (tmp_path / "plugged" / "config.json").exists()
    code, out, _ = run(capsys, "info", tmp_path / "adapter")
    assert code == 0 and "gradot-adapter" in out


@pytest.mark.parametrize("argv,message", [
    (["compress", "--model", "no-such-model", "--out", "x"], "unknown model 'no-such-model'"),
    (["info", "/nonexistent/dir"], "not a directory"),
])
def test_bad_input_is_one_clean_line(argv, message, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("keep", ["0", "1.5", "-0.2", "abc"])
def test_keep_outside_unit_interval_is_refused(keep, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--keep", keep, "--out", "x"])
    assert exc.value.code == 2
    assert "--keep must be" in capsys.readouterr().err


def test_too_few_layers_and_short_calibration(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "compress", "--model", tiny_model_dir, "--adapter-layers", "3", "--out", tmp_path / "e")
    assert code == 2 and "needs at least 7" in err
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    code, _, err = run(capsys, "compress", "--model", tiny_model_dir, "--method", "crash", "--calib", short,
                       "--out", tmp_path / "e")
    assert code == 2 and "calibration text" in err and "tokens" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run(capsys, "compress", "--model", tiny_model_dir, "--method", "crash", "--calib", empty,
                       "--out", tmp_path / "e")
    assert code == 2 and "empty" in err
    assert not (tmp_path / "e").exists()


def _cli_process(*argv):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gradot

    env = dict(os.environ, PYTHONPATH=str(Path(gradot.__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-m", "gradot.cli", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_info_into_a_closed_pipe_ends_quietly(tiny_model_dir, tmp_path, capsys):
    # `gradot info emu | head -3`: the reader leaves before the output is written.
    assert run(capsys, "compress", "--model", tiny_model_dir, "--keep", "0.5", "--out", tmp_path / "emu")[0] == 0
    proc = _cli_process("info", tmp_path / "emu")
    proc.stdout.close()  # closed before the child writes (it takes a second to import)
    err = proc.stderr.read()
    assert proc.wait() == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_adapter_info_lists_training_one_item_a_line(tiny_model_dir, tmp_path, capsys):
    from gradot.artifacts import load_emulator, save_adapter

    assert run(capsys, "compress", "--model", tiny_model_dir, "--keep", "0.5", "--out", tmp_path / "emu")[0] == 0
    training = {"train_loss": 1.23456, "steps": 4, "data": ["pairs"], "config": {"max_length": 64, "lr": None}}
    save_adapter(load_emulator(tmp_path / "emu"), tmp_path / "adapter", training=training)
    code, out, _ = run(capsys, "info", tmp_path / "adapter")
    assert code == 0
    assert "{" not in out and "'" not in out  # no raw Python dict
    lines = out.splitlines()
    start = lines.index("training:")
    assert lines[start + 1:start + 7] == ["  train_loss: 1.235", "  steps: 4", "  data: pairs", "  config:",
                                          "    max_length: 64", "    lr: None"]
