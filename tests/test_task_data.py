"""Task data from the Hugging Face Hub (gradot.evaluation.task_data): rows in each Hub dataset's schema become
the local layout that gradot.evaluation.tasks reads; `gradot data fetch` from a pre-filled Hugging Face cache
(the code path a download fills), offline; a run without any data fails before the model loads,
with one line naming both ways out, and leaves no settings record behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradot.evaluation.task_data import SOURCES, TEXT, convert_rows
from gradot.evaluation.tasks import (arc_prompt, hellaswag_preprocess, hellaswag_prompt, load_task, openbookqa_prompt,
                          piqa_prompt, race_prompt, sciq_prompt, webqs_prompt)

SRC = Path(__file__).resolve().parents[1] / "src"

# --------------------------------------------------------------------------- rows as the Hub has them

OBQA = {"id": "7-980", "question_stem": "The sun is responsible for",
        "choices": {"text": ["puppies learning new tricks", "children growing up", "flowers wilting", "plants sprouting"],
                    "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
ARC = {"id": "Mercury_7175875", "question": "Which is a fossil fuel?",
       "choices": {"text": ["wood", "coal", "wind"], "label": ["1", "2", "3"]}, "answerKey": "2"}
PIQA = [{"goal": "To open a jar", "sol1": "twist the lid", "sol2": "twist the jar's bottom", "label": 0},
        {"goal": "To dry a towel", "sol1": "put it in water", "sol2": "hang it in the sun", "label": 1}]
HELLASWAG = {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
             "ctx_b": "he", "ctx": "A man is sitting on a roof. he",
             "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
             "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "zeroshot", "label": "3"}
SCIQ = {"question": "What type of organism is commonly used in preparation of foods such as cheese?",
        "distractor3": "viruses", "distractor1": "protozoa", "distractor2": "gymnosperms",
        "correct_answer": "mesophilic organisms", "support": "Mesophiles grow best in moderate temperature."}
WEBQS = {"url": "http://www.freebase.com/view/en/justin_bieber", "question": "what is the name of justin bieber brother?",
         "answers": ["Jazmyn Bieber", "Jaxon Bieber"]}
RACE = [  # one row per question; two questions of one passage, then another passage
    {"example_id": "high1.txt", "article": "Tom went home.", "answer": "B", "question": "Where did Tom go?",
     "options": ["school", "home", "park", "shop"]},
    {"example_id": "high1.txt", "article": "Tom went home.", "answer": "A", "question": "Tom went  _  .",
     "options": ["home", "out", "away", "up"]},
    {"example_id": "high2.txt", "article": "Ann reads.", "answer": "C", "question": "What does Ann do?",
     "options": ["sings", "runs", "reads", "cooks"]},
]
WIKI = [{"text": ""}, {"text": " = Valkyria Chronicles III = \n"}, {"text": ""}, {"text": " Senjō no Valkyria 3 . \n"}]


def _write(root: Path, name: str, rows) -> None:
    folder = root / (SOURCES[name].folder or name)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, data in convert_rows(name, rows).items():
        (folder / file_name).write_bytes(data)


@pytest.fixture
def converted(tmp_path):
    both = lambda rows: {"train": rows, "validation": rows}  # noqa: E731
    _write(tmp_path, "openbookqa", both([OBQA]))
    _write(tmp_path, "arc_easy", both([ARC]))
    _write(tmp_path, "arc_challenge", both([ARC]))
    _write(tmp_path, "piqa", both(PIQA))
    _write(tmp_path, "hellaswag", both([HELLASWAG]))
    _write(tmp_path, "sciq", both([SCIQ]))
    _write(tmp_path, "webquestions", both([WEBQS]))
    _write(tmp_path, "race", both(RACE))
    _write(tmp_path, TEXT, {"validation": WIKI, "test": WIKI})
    return tmp_path


def test_hub_rows_read_as_the_release(converted):
    """Every task's Hub rows, converted, give the prompts, choices and gold the harness builds from them."""
    (ex,) = load_task("openbookqa", "validation", converted)
    assert (ex.prompt, ex.choices, ex.gold) == (openbookqa_prompt(OBQA["question_stem"]), tuple(OBQA["choices"]["text"]), 3)
    for task in ("arc_easy", "arc_challenge"):
        (ex,) = load_task(task, "train", converted)
        assert (ex.prompt, ex.choices, ex.gold) == (arc_prompt(ARC["question"]), ("wood", "coal", "wind"), 1)
    piqa = load_task("piqa", "validation", converted)
    assert [(e.prompt, e.choices, e.gold) for e in piqa] == [
        (piqa_prompt(r["goal"]), (r["sol1"], r["sol2"]), r["label"]) for r in PIQA]
    (ex,) = load_task("hellaswag", "validation", converted)
    assert ex.prompt == hellaswag_prompt(HELLASWAG["activity_label"], HELLASWAG["ctx_a"], HELLASWAG["ctx_b"])
    assert ex.choices == tuple(hellaswag_preprocess(e) for e in HELLASWAG["endings"]) and ex.gold == 3
    (ex,) = load_task("sciq", "validation", converted)
    assert ex.prompt == sciq_prompt(SCIQ["support"], SCIQ["question"])
    assert ex.choices == ("protozoa", "gymnosperms", "viruses", "mesophilic organisms") and ex.gold == 3
    (ex,) = load_task("webquestions", "validation", converted)
    assert ex.prompt == webqs_prompt(WEBQS["question"]) and ex.answers == tuple(WEBQS["answers"])
    # RACE: questions of one passage joined; training has every question, evaluation each passage's last.
    train = load_task("race", "train", converted)
    assert [e.gold for e in train] == [1, 0, 2]
    assert train[1].prompt == race_prompt("Tom went home.", [("Where did Tom go?", "home")], "Tom went  _  .")
    assert [e.prompt for e in load_task("race", "validation", converted)] == [train[1].prompt, train[2].prompt]
    raw = (converted / "text" / "wikitext-2-raw" / "wiki.valid.raw").read_text()
    assert raw == " = Valkyria Chronicles III = \n Senjō no Valkyria 3 . \n"


def _prefill_hub_cache(home: Path, name: str, rows: dict[str, list[dict]]) -> None:
    """``rows`` (per Hub split) as parquet files in the Hugging Face cache's layout, as a download leaves them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = SOURCES[name]
    repo = home / "hub" / ("datasets--" + source.repo.replace("/", "--"))
    folder = repo / "snapshots" / source.revision / (source.config or "data")
    folder.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(source.revision)
    for split, split_rows in rows.items():
        pq.write_table(pa.Table.from_pylist(split_rows), folder / f"{split}-00000-of-00001.parquet")


def _gradot(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradot.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADOT_"))}
    return {**env, "PYTHONPATH": str(SRC), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "GRADOT_CACHE": str(tmp_path / "gradot-cache"), "OMP_NUM_THREADS": "1"}


def test_fetch_from_a_prefilled_hub_cache_offline(tmp_path):
    """`gradot data fetch` reads the pinned revision from the Hugging Face cache, writes the local
    layout with checksums, and keeps an intact copy; a task absent from the cache fails in one line."""
    env = _offline_env(tmp_path)
    _prefill_hub_cache(tmp_path / "hf", "sciq", {"train": [SCIQ, SCIQ], "validation": [SCIQ], "test": [SCIQ]})
    out = tmp_path / "data"
    done = _gradot(["data", "fetch", "--tasks", "sciq", "--to", str(out)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(load_task("sciq", "train", out)) == 2 and len(load_task("sciq", "validation", out)) == 1
    record = json.loads((out / "fetched.json").read_text())["sciq"]
    assert record["repo"] == "allenai/sciq" and record["revision"] == SOURCES["sciq"].revision
    assert set(record["sha256"]) == {"train.json", "validation.json"}
    from gradot.evaluation.task_data import fetched_intact

    assert fetched_intact(out, "sciq")
    (out / "sciq" / "train.json").write_text("[]")  # a changed file is no longer the fetched one
    assert not fetched_intact(out, "sciq")

    failed = _gradot(["data", "fetch", "--tasks", "piqa", "--to", str(out)], env, tmp_path)
    assert failed.returncode == 2
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("gradot data: error: cannot download baber/piqa") and "HF_HUB_OFFLINE" in error
    assert "--data-dir" in error and "gradot data fetch" in error


def test_fetched_cache_is_where_runs_look_last(tmp_path, monkeypatch):
    """No --data-dir, no $GRADOT_DATA_DIR, no shared/data: the runs read the copy `data fetch` wrote."""
    from gradot.evaluation import tasks
    from gradot.evaluation.task_data import data_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADOT_DATA_DIR", raising=False)
    monkeypatch.setenv("GRADOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "repository_data_dir", lambda: tmp_path / "no-shared")
    with pytest.raises(FileNotFoundError, match="--data-dir.*gradot data fetch"):
        tasks.resolve_data_dir()
    _write(data_cache_dir(), "sciq", {"train": [SCIQ], "validation": [SCIQ]})
    assert tasks.resolve_data_dir() == data_cache_dir().resolve()
    assert len(load_task("sciq")) == 1


def test_pipeline_without_data_fails_before_the_model_and_leaves_no_record(tmp_path, monkeypatch, capsys):
    """No data anywhere and no network: one line naming --data-dir and `gradot data fetch`, before
    any model loads; the output folder gets no settings record, so the retry with --data-dir runs."""
    import huggingface_hub.constants

    from gradot import modeling
    from gradot.evaluation import tasks
    from gradot.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GRADOT_DATA_DIR", raising=False)
    monkeypatch.setenv("GRADOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "repository_data_dir", lambda: tmp_path / "no-shared")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, at once
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    out = tmp_path / "run"
    code = main(["pipeline", "--model", "default", "--method", "uniform", "--tasks", "piqa", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("gradot pipeline: error: cannot download baber/piqa")
    assert "--data-dir" in err[-1] and "gradot data fetch" in err[-1]
    assert not (out / "settings.json").exists()


def test_a_named_data_folder_lacking_files_is_refused_not_replaced(tmp_path, capsys):
    from gradot.cli import main

    (tmp_path / "mine").mkdir()
    code = main(["pipeline", "--model", "default", "--tasks", "piqa", "--data-dir", str(tmp_path / "mine"),
                 "--out", str(tmp_path / "run"), "--calib", __file__])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "lacks task files" in err and "piqa/train.jsonl" in err and len(err.splitlines()) == 1
