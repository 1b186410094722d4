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


def _cli_process(*argv, cwd=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gradot

    env = dict(os.environ, PYTHONPATH=str(Path(gradot.__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-m", "gradot.cli", *map(str, argv)], env=env, cwd=cwd,
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


@pytest.mark.parametrize("argv", [
    ["compress", "--keep", "0", "--out", "x"],
    ["compress", "--method", "foo", "--out", "x"],
    ["pipeline", "--tasks", "piqq"],
    ["finetune", "--emulator", "e", "--task", "piqa"],  # --out missing
    [],
])
def test_usage_errors_are_one_line_pointing_at_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.count("\n") == 1 and err.startswith("gradot") and "--help')" in err and "usage:" not in err, err


def test_help_shows_defaults(capsys):
    for argv, shown in [(["compress"], ["(default: 0.7)", "(default: uniform)", "(default: 32)"]),
                        (["pipeline"], ["(default: 1000)", "(default: runs/pipeline)", "(default: piqa)"]),
                        (["eval"], ["examples per forward pass when scoring"])]:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert exc.value.code == 0
        assert all(s in out for s in shown), (argv, out)
        assert "(default: None)" not in out and "(default: False)" not in out


def test_cheap_checks_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("loaded the model before a cheap check")

    monkeypatch.setattr("gradot.modeling.load_model", no_model)
    full = tmp_path / "full"
    (full / "sub").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["compress", "--out", full], "already exists (pass --overwrite"),
        (["compress", "--out", empty], "is an empty folder (pass --overwrite"),  # not written into silently
        (["compress", "--method", "gradot", "--calib", tmp_path / "nope.txt", "--out", tmp_path / "e"],
         "calibration file not found"),
        (["plugin", "--adapter", tmp_path / "nope", "--out", tmp_path / "p"], "nope: not a directory"),
        (["plugin", "--adapter", tmp_path / "nope", "--out", full], "already exists"),
        (["eval", "--model", "default", "--adapter", tmp_path / "nope", "--tasks", "piqa"], "nope: not a directory"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_finetune_data_in_neither_format_names_the_formats(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("gradot.artifacts.load_emulator", lambda *a, **k: pytest.fail("loaded before the data"))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "answer": "a"}]')
    code, _, err = run(capsys, "finetune", "--emulator", tmp_path, "--data", bad, "--out", tmp_path / "a")
    assert code == 2 and "found 'question', 'answer'" in err and "Alpaca-style" in err and "JSONL with 'text'" in err


def test_eval_is_quiet_by_default_and_verbose_under_v(tiny_model_dir, tmp_path):
    # Run where a user would: outside any git checkout (lm-eval runs `git describe` there).
    import subprocess

    if subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip("the temporary folder is inside a git checkout")
    argv = ["eval", "--model", tiny_model_dir, "--tasks", "piqa", "--limit", "2"]
    quiet = _cli_process(*argv, cwd=tmp_path)
    out, err = quiet.communicate()
    assert quiet.returncode == 0, err
    assert "piqa: acc" in out
    assert "fatal:" not in err and "`pretrained` model kwarg" not in err and "already-initialized" not in err, err
    assert "Generating validation split" not in err and "Loading weights" not in err, err
    loud = _cli_process("-v", *argv, cwd=tmp_path)
    out, err = loud.communicate()
    assert loud.returncode == 0, err
    assert "`pretrained` model kwarg" in err and "fatal:" not in err, err
    assert f"loading model {tiny_model_dir}: done in" in err  # the stage, logged


def test_stage_lines_on_a_terminal_and_in_a_log():
    import io

    from gradot.progress import StageCounter, stage

    log = io.StringIO()
    with stage("writing x", stream=log):
        pass
    assert log.getvalue() == ""  # not a terminal: nothing but an INFO log line (gradot -v)
    log = io.StringIO()
    with pytest.raises(ValueError), stage("loading y", stream=log):
        raise ValueError("bad")
    assert log.getvalue() == ""  # the error is the one line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with stage("scoring", stream=term):
        import time
        time.sleep(0.6)  # the spinner redraws every 0.25 s
    text = term.getvalue()
    assert text.startswith("scoring ...") and "\rscoring | " in text and text.endswith("\n")
    assert text.rsplit("\r", 1)[1].startswith("scoring: done in")

    lines = []
    counter = StageCounter(3, write=lines.append)
    counter.start("a")
    counter.start("b", cached=True)
    counter.start("c")
    counter.done()
    assert lines[0] == "[1/3] a" and lines[1] == "[2/3] b (cached)"
    assert lines[2].startswith("[3/3] c (") and "so far, about" in lines[2] and lines[2].endswith("left)")
