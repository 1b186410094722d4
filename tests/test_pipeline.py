"""The data owner's commands and the pipeline on a tiny model folder, end to end."""

import json

import pytest

from gradot.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pipeline_writes_table_json_and_png_and_resumes(tiny_model_dir, calib_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["pipeline", "--model", tiny_model_dir, "--method", "uniform,crash", "--tasks", "piqa,arc_easy",
            "--keep", "0.5", "--limit", "4", "--train-limit", "8", "--max-steps", "2", "--train-batch-size", "4",
            "--full-ft", "--calib", calib_file, "--calib-sequences", "4", "--calib-len", "16", "--out", out]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    # One numbered line per stage: 2 tasks x (Full ZS, Full FT, Adapter FT) + 2 methods x (compress + 3 cells
    # x 2 tasks).
    stages = [line for line in err.splitlines() if line.startswith("[")]
    assert len(stages) == 20 and stages[0] == "[1/20] Full ZS on piqa", stages
    assert "[3/20] Adapter FT on piqa (" in err and "[9/20] uniform: Emu FT on piqa (" in err and "left)" in err
    assert "training adapter on piqa" in err and "training full on piqa" in err  # labelled bars
    table = (out / "results.md").read_text()
    for row in ("Full ZS", "Full FT", "Adapter FT", "uniform: Emu ZS", "uniform: Emu FT", "uniform: Plug-in", "uniform: Δ",
                "crash: Plug-in"):
        assert f"| {row} |" in table
    info = json.loads((out / "results.json").read_text())
    assert info["cells"]["Full ZS"]["piqa"]["n"] == 4
    assert info["cells"]["uniform: Emu FT"]["piqa"]["training"]["config"]["max_length"] == 256
    assert 0 <= info["table"]["uniform: Plug-in"]["avg"][0] <= 1
    # Transfer = (Plug-in − Full ZS) / (Adapter FT − Full ZS), per method and task.
    t = info["table"]
    for task in ("piqa", "arc_easy"):
        gain = t["Adapter FT"][task][0] - t["Full ZS"][task][0]
        if gain:
            want = (t["uniform: Plug-in"][task][0] - t["Full ZS"][task][0]) / gain
            assert info["transfer"]["uniform"][task][0] == pytest.approx(want)
    assert info["cells"]["Adapter FT"]["piqa"]["training"]["mode"] == "adapter"
    assert "Transfer = (Plug-in − Full ZS)" in table
    cell = info["cells"]["uniform: Plug-in"]["piqa"]
    assert info["table_acc_norm"]["uniform: Plug-in"]["piqa"] == [cell["acc_norm"], cell["acc_norm_stderr"]]
    assert "acc_norm (length-normalised" in table
    assert "s/step, loss" in table.split("Cost per cell")[1]  # training cost of the fine-tuned rows
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "adapters" / "uniform-keep0.5-piqa" / "adapter.safetensors").exists()
    assert not (out / "checkpoints").exists()  # deleted once each fine-tuned cell was done
    # Resume: a killed run loses at most its unfinished cell; finished cells are not recomputed.
    (out / "cells" / "uniform-plugin-arc_easy.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert "[1/20] Full ZS on piqa (cached)" in err and "[20/20] crash: Plug-in on arc_easy (cached)" in err
    assert "uniform: Plug-in on arc_easy (cached)" not in err
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert "uniform-plugin-arc_easy.json" in after
    assert all(after[name] == t for name, t in before.items())
    # Report only: the table from the cells there are, a missing one shown as '–', nothing computed.
    (out / "cells" / "crash-emu_ft-piqa.json").unlink()

    def no_model(*a, **k):
        raise AssertionError("--report-only loaded a model")

    monkeypatch.setattr("gradot.modeling.load_model", no_model)
    code, _, err = run(capsys, *argv, "--report-only")
    assert code == 0, err
    assert not (out / "cells" / "crash-emu_ft-piqa.json").exists()
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| crash: Emu FT |"))
    assert row.split(" | ")[1] == "–"  # piqa missing, arc_easy present, no average
    assert json.loads((out / "results.json").read_text())["table"]["crash: Emu FT"].keys() == {"arc_easy"}
    # Cells are keyed by method and task only: other settings must not reuse them (checked before
    # any model is loaded), while the evaluation batch size or one more task may change.
    code, _, err = run(capsys, *argv, "--keep", "0.4", "--train-limit", "6")
    assert code == 2 and "other settings (keep: 0.5 -> 0.4; train_limit: 8 -> 6)" in err
    code, _, err = run(capsys, *argv, "--report-only", "--eval-batch-size", "2", "--tasks", "piqa")
    assert code == 0, err
    # The report covers the folder, not only this command's tasks and methods (one task per command
    # must not leave a report of the last task alone); this command's come first.
    info = json.loads((out / "results.json").read_text())
    assert info["config"]["tasks"] == ["piqa", "arc_easy"] and info["config"]["methods"] == ["uniform", "crash"]
    assert "| row | piqa | arc_easy | avg |" in (out / "results.md").read_text()
    code, _, err = run(capsys, *argv, "--report-only", "--tasks", "arc_easy", "--method", "crash")
    assert code == 0, err
    info = json.loads((out / "results.json").read_text())
    assert info["config"]["tasks"] == ["arc_easy", "piqa"] and info["config"]["methods"] == ["crash", "uniform"]
    assert info["table"]["uniform: Plug-in"].keys() == {"piqa", "arc_easy", "avg"}
    assert list(info["table"])[:9] == ["Full ZS", "Full FT", "Adapter FT", "crash: Emu ZS", "crash: Emu FT",
                                       "crash: Plug-in", "uniform: Emu ZS", "uniform: Emu FT", "uniform: Plug-in"]


def test_finetune_and_eval_commands(tiny_model_dir, tmp_path, capsys, monkeypatch):
    emu = tmp_path / "emu"
    assert run(capsys, "compress", "--model", tiny_model_dir, "--keep", "0.5", "--out", emu)[0] == 0
    again = ["finetune", "--emulator", emu, "--task", "sciq", "--train-limit", "8", "--max-steps", "2",
             "--train-batch-size", "4", "--max-length", "64", "--out", tmp_path / "adapter"]
    code, out, err = run(capsys, *again)
    assert code == 0, err
    assert "adapter written to" in out and "s/step" in out
    training = json.loads((tmp_path / "adapter" / "manifest.json").read_text())["training"]
    assert training["config"]["max_length"] == 64
    with monkeypatch.context() as m:  # refused before training, not after
        m.setattr("gradot.finetune.finetune_adapter", lambda *a, **k: pytest.fail("trained before checking --out"))
        code, _, err = run(capsys, *again)
    assert code == 2 and "already exists" in err
    checkpoints = tmp_path / "adapter.checkpoints"
    assert not checkpoints.exists()  # deleted once the adapter was written
    code, _, err = run(capsys, *again, "--overwrite", "--keep-checkpoints")
    assert code == 0 and (checkpoints / "checkpoint-2").is_dir(), err
    loss = json.loads((tmp_path / "adapter" / "manifest.json").read_text())["training"]["train_loss"]
    code, out, err = run(capsys, *again, "--overwrite", "--resume", "--keep-checkpoints")  # nothing left to do
    assert code == 0 and "no step to run" in out, err
    resumed = json.loads((tmp_path / "adapter" / "manifest.json").read_text())["training"]
    assert resumed["steps_this_run"] == 0 and resumed["train_loss"] == pytest.approx(loss) and loss > 0
    code, out, err = run(capsys, *again, "--overwrite")  # starting over replaces the earlier checkpoints too
    assert code == 0, err
    assert not checkpoints.exists()
    with pytest.raises(SystemExit):
        main(["finetune", "--emulator", str(emu), "--task", "wikitext", "--out", str(tmp_path / "a2")])
    assert "unknown task" in capsys.readouterr().err
    code, out, err = run(capsys, "eval", "--model", tiny_model_dir, "--adapter", tmp_path / "adapter",
                         "--tasks", "sciq", "--limit", "3", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["sciq"]["n"] == 3
    code, out, err = run(capsys, "eval", "--emulator", emu, "--tasks", "sciq", "--limit", "3")
    assert code == 0, err and "sciq: acc" in out


def test_pipeline_rejects_unknown_task_and_method(capsys):
    with pytest.raises(SystemExit):
        main(["pipeline", "--tasks", "piqa,nosuchtask"])
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # perplexity only: no training data to fine-tune on
        main(["pipeline", "--tasks", "wikitext"])
    assert "unknown task" in capsys.readouterr().err
    code, _, err = run(capsys, "pipeline", "--method", "magic", "--tasks", "piqa")
    assert code == 2 and "unknown method" in err


def test_finetune_records_from_a_plain_text_file(tmp_path):
    from argparse import Namespace

    from gradot.cli.data_owner import _records
    path = tmp_path / "notes.txt"
    path.write_text("the cat sat on the mat . " * 10)
    records = _records(Namespace(task=None, data=str(path), data_dir=None, train_limit=None))
    assert records == [path.read_text()]


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_manifests_carry_no_local_paths(tiny_model_dir, calib_file, tmp_path, capsys):
    import os
    from pathlib import Path

    emu, adapter = tmp_path / "emu", tmp_path / "adapter"
    code, _, err = run(capsys, "compress", "--model", tiny_model_dir, "--method", "crash", "--keep", "0.5",
                       "--calib", calib_file, "--calib-sequences", "4", "--calib-len", "16", "--out", emu)
    assert code == 0, err
    code, _, err = run(capsys, "finetune", "--emulator", emu, "--task", "sciq", "--train-limit", "8",
                       "--max-steps", "2", "--train-batch-size", "4", "--max-length", "64", "--keep-checkpoints",
                       "--out", adapter)
    assert code == 0, err
    code, _, err = run(capsys, "finetune", "--emulator", emu, "--task", "sciq", "--train-limit", "8",
                       "--max-steps", "2", "--train-batch-size", "4", "--max-length", "64", "--resume",
                       "--overwrite", "--out", adapter)  # a resumed run names the checkpoint it resumed from
    assert code == 0, err
    private = [str(tmp_path), str(Path.home()), os.path.realpath(tmp_path)]
    for folder in (emu, adapter):
        manifest = json.loads((folder / "manifest.json").read_text())
        for text in _strings(manifest):
            assert not os.path.isabs(text) and not any(p in text for p in private), (folder.name, text)
        for path in folder.iterdir():  # config, tokenizer and tensor files too
            assert not any(p.encode() in path.read_bytes() for p in private), path
    emulator = json.loads((emu / "manifest.json").read_text())
    assert emulator["base"]["name_or_path"] == tiny_model_dir.name
    calib = emulator["calibration"]
    assert calib["name"] == calib_file.name and calib["bytes"] == calib_file.stat().st_size
    assert len(calib["sha256"]) == 64
    training = json.loads((adapter / "manifest.json").read_text())["training"]
    assert training["resumed_from"] == "checkpoint-2" and "output_dir" not in training["config"]


def test_learning_rates_recorded_and_old_folders_keep_theirs(tmp_path, monkeypatch):
    """A folder's record names the effective rate of every task (adapter and Full FT): a later change
    of a default refuses it instead of mixing recipes, and naming its old rate claims it again. A
    folder recorded with ``learning_rate`` (then --lr set both rates; defaults 1e-4 / 2e-5) keeps those."""
    from gradot.errors import PipelineSettingsError
    from gradot.pipeline import Pipeline, PipelineConfig, cell_settings, claim_output_folder

    def settings(**kw):
        return cell_settings(PipelineConfig(model="m", methods=["uniform"], tasks=["piqa"], keep=0.7,
                                            out=str(tmp_path), **kw))

    monkeypatch.setattr("gradot.pipeline.TASK_LR", {"default": 3e-4})
    now = settings()
    assert set(now["learning_rates"]["adapter"].values()) == {3e-4}
    assert set(now["learning_rates"]["full"].values()) == {2e-5}
    old = {k: v for k, v in now.items() if k != "learning_rates"}
    (tmp_path / "settings.json").write_text(json.dumps({**old, "learning_rate": None}))
    with pytest.raises(PipelineSettingsError, match=r"learning_rates.adapter: 0.0001 -> 0.0003 \(every task\)"):
        claim_output_folder(tmp_path, now)
    claim_output_folder(tmp_path, settings(learning_rate=1e-4))  # its old rate, named: claimed
    # Before --full-lr, --lr set both rates: such a folder holds Full FT cells at that rate.
    (tmp_path / "settings.json").write_text(json.dumps({**old, "learning_rate": 3e-4}))
    claim_output_folder(tmp_path, settings(learning_rate=3e-4, full_learning_rate=3e-4))
    with pytest.raises(PipelineSettingsError, match=r"learning_rates.full: 0.0003 -> 2e-05 \(every task\)"):
        claim_output_folder(tmp_path, settings(learning_rate=3e-4))
    # --lr reaches the adapters only, --full-lr Full FT only.
    pipe = Pipeline.__new__(Pipeline)
    pipe.cfg = PipelineConfig(model="m", methods=[], tasks=[], keep=0.7, out=str(tmp_path), learning_rate=3e-4)
    assert pipe._ft_config(tmp_path, "piqa").learning_rate == 3e-4
    assert pipe._ft_config(tmp_path, "piqa", full=True).learning_rate is None  # FULL_LR decides


def test_folder_cells_reads_only_pipeline_cells(tmp_path):
    """The report's folder scan: original rows, method rows, nothing else (a user's file, an unknown task)."""
    from gradot.pipeline import folder_cells

    for name in ("full_zs-piqa", "adapter_ft-arc_easy", "gradot-emu_ft-sciq", "scaleot-plugin-arc_easy",
                 "notes", "gradot-emu_zs-mytask", "gradot-plot-piqa"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"acc": 0.5}))
    got = sorted((row, task) for row, task, _ in folder_cells(tmp_path))
    assert got == [("Adapter FT", "arc_easy"), ("Full ZS", "piqa"), ("gradot: Emu FT", "sciq"),
                   ("scaleot: Plug-in", "arc_easy")]


def test_bench_table_takes_each_task_whole_from_the_first_folder_holding_it(tmp_path, monkeypatch, capsys):
    """bench/table.py: one table over several folders; a task a later folder also holds is not mixed in."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import table

    def cells(folder, acc, **tasks):
        (folder / "cells").mkdir(parents=True)
        for task, rows in tasks.items():
            for row in rows:
                (folder / "cells" / f"{row}-{task}.json").write_text(
                    json.dumps({"acc": acc[row], "acc_stderr": 0.01, "n": 100}))

    acc = {"full_zs": 0.5, "adapter_ft": 0.7, "gradot-plugin": 0.6}
    rows = list(acc)
    cells(tmp_path / "a", acc, race=rows)
    cells(tmp_path / "b", {r: v + 0.2 for r, v in acc.items()}, race=rows, piqa=rows)
    table.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    info = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "race already taken" in capsys.readouterr().out
    assert list(info["sources"]) == ["piqa", "race"]  # the CLI's task order, not the folders'
    assert info["sources"]["race"]["folder"].endswith("a") and info["table"]["Full ZS"]["race"][0] == 0.5
    assert info["transfer"]["gradot"]["race"][0] == pytest.approx(0.5)
    assert info["transfer"]["gradot"]["avg"][0] == pytest.approx(0.5)  # (0.1 + 0.1) / (0.2 + 0.2)
    assert "race from" in (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit, match="not a pipeline folder"):
        table.main([str(tmp_path), "--out", str(tmp_path / "out")])
